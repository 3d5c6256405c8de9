//! `verify-fleet --anchor URL --brokers FILE`: every broker's log verified
//! from a fleet's shared anchor alone, each under its origin's prefix, and
//! each broker that is missing from it or has stopped publishing named.

use std::time::{Duration, SystemTime};

use anyhow::{bail, Result};
use grantline_proto::audit::VerifierKey;

use crate::anchor::Anchor;
use crate::fleet::FleetLog;
use crate::verify;

/// A broker named in a brokers file: its origin and its key history,
/// oldest first (the last key signs its checkpoints).
#[derive(Debug, Clone)]
pub struct NamedBroker {
    pub origin: String,
    pub keys: Vec<VerifierKey>,
}

/// The most brokers a brokers file may name.
pub const MAX_BROKERS: usize = 10_000;

/// Parses a brokers file: one verifier key a line (each broker's
/// `audit.vkey`, or the lines of its `audit.vkeys` for a rotated key),
/// blank lines and `#` comments skipped. A key's name is its broker's
/// origin; keys of one origin form its history, in the order given.
pub fn parse_brokers(text: &str, file: &str) -> Result<Vec<NamedBroker>> {
    let mut brokers: Vec<NamedBroker> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = VerifierKey::parse(line).map_err(|e| {
            anyhow::anyhow!("{file} line {}: not a verifier key ({e}); give each broker's audit.vkey", n + 1)
        })?;
        let count = brokers.len();
        match brokers.iter_mut().find(|b| b.origin == key.name()) {
            Some(b) if b.keys.contains(&key) => bail!("{file} line {}: the key of {} is given twice", n + 1, b.origin),
            Some(b) => b.keys.push(key),
            None if count == MAX_BROKERS => bail!("{file} names more than {MAX_BROKERS} brokers"),
            None => brokers.push(NamedBroker { origin: key.name().to_owned(), keys: vec![key] }),
        }
    }
    if brokers.is_empty() {
        bail!("{file} names no broker; give one verifier key (audit.vkey) a line");
    }
    Ok(brokers)
}

/// What the anchor holds of each broker: the verdict of each log found,
/// and a problem for each broker missing or whose checkpoint was last
/// written more than `max_age` before `now`.
pub async fn verify_brokers(
    anchor: &Anchor,
    brokers: &[NamedBroker],
    max_age: Duration,
    now: SystemTime,
) -> Result<(Vec<FleetLog>, Vec<String>)> {
    let mut logs = Vec::new();
    let mut problems = Vec::new();
    for b in brokers {
        let log = anchor.for_origin(&b.origin);
        let Some(written) = log.checkpoint_written().await? else {
            problems.push(format!(
                "broker {} is missing: nothing is published under {} (it never started, or its `anchor` \
                 setting points elsewhere)",
                b.origin,
                log.url()
            ));
            continue;
        };
        let (verdict, _) = verify::verify_anchor(&log, &b.keys, &b.keys[b.keys.len() - 1..]).await?;
        if let Ok(age) = now.duration_since(written) {
            if age > max_age {
                problems.push(format!(
                    "broker {} has stopped publishing: its checkpoint under {} was last written {} s ago, more \
                     than --max-age {} s (a running broker writes it every anchor_heartbeat); check that it runs \
                     and can write to the anchor",
                    b.origin,
                    log.url(),
                    age.as_secs(),
                    max_age.as_secs()
                ));
            }
        }
        logs.push(FleetLog { db: log.url().to_owned(), verdict });
    }
    Ok((logs, problems))
}

#[cfg(test)]
mod tests {
    use super::*;
    use grantline_proto::audit::SignerKey;

    #[test]
    fn a_brokers_file_groups_keys_by_origin_and_refuses_what_is_not_a_key() {
        let a1 = SignerKey::generate("fleet/a").unwrap().verifier().clone();
        let a2 = SignerKey::generate("fleet/a").unwrap().verifier().clone();
        let b = SignerKey::generate("fleet/b").unwrap().verifier().clone();
        let text = format!("# the fleet\n{a1}\n\n{b}\n{a2}\n");
        let brokers = parse_brokers(&text, "brokers").unwrap();
        assert_eq!(brokers.len(), 2);
        assert_eq!((brokers[0].origin.as_str(), brokers[0].keys.clone()), ("fleet/a", vec![a1.clone(), a2]));
        assert_eq!(brokers[1].keys, vec![b]);
        for (text, want) in [
            ("not a key\n".to_owned(), "line 1: not a verifier key"),
            (format!("{a1}\n{a1}\n"), "given twice"),
            ("# nothing\n".to_owned(), "names no broker"),
        ] {
            let e = parse_brokers(&text, "brokers").unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
