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

/// The most names at the anchor's top looked at for logs no broker named.
const MAX_LISTED: usize = 2 * MAX_BROKERS;

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
/// and a problem for each broker missing, whose checkpoint was last
/// written more than `max_age` before `now` (or after it), or whose log
/// could not be read; and for each log in the anchor that no broker named
/// holds. A broker's trouble is its own verdict: the others are still
/// checked.
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
        match verify_one(&log, b, max_age, now).await {
            Ok((verdict, stale)) => {
                problems.extend(stale);
                logs.push(FleetLog { db: log.url().to_owned(), verdict });
            }
            Err(e) => problems.push(e),
        }
    }
    let named: std::collections::HashSet<String> =
        brokers.iter().map(|b| crate::anchor::origin_segment(&b.origin)).collect();
    match anchor.names_under("", MAX_LISTED).await {
        Err(e) => problems.push(format!("cannot list the anchor for logs the brokers file does not name: {e:#}")),
        Ok(names) => {
            if names.len() == MAX_LISTED {
                problems.push(format!(
                    "the anchor's top holds {MAX_LISTED} names or more; only those were looked at for logs the \
                     brokers file does not name"
                ));
            }
            for name in names.iter().filter(|n| !named.contains(*n)) {
                let stray = if name == "checkpoint" {
                    Ok(true)
                } else {
                    anchor.for_origin_segment(name).exists("checkpoint").await
                };
                match stray {
                    Ok(false) => {}
                    Ok(true) => problems.push(format!(
                        "the anchor holds a log {} that the brokers file does not name: a broker left out of it, \
                         or one that is not of the fleet",
                        if name == "checkpoint" { "at its top".to_owned() } else { format!("under {name}/") }
                    )),
                    Err(e) => problems.push(format!("cannot read {name}/ in the anchor: {e:#}")),
                }
            }
        }
    }
    Ok((logs, problems))
}

/// One broker's verdict and whether it stopped publishing; `Err` names why
/// it has no verdict (missing, or its objects unreadable).
async fn verify_one(
    log: &Anchor,
    b: &NamedBroker,
    max_age: Duration,
    now: SystemTime,
) -> Result<(Result<grantline_proto::audit::Summary, grantline_proto::audit::Failure>, Option<String>), String> {
    let unreadable =
        |e: anyhow::Error| format!("broker {}: cannot verify its log under {}: {e:#}", b.origin, log.url());
    let Some(written) = log.checkpoint_written().await.map_err(unreadable)? else {
        return Err(format!(
            "broker {} is missing: nothing is published under {} (it never started, or its `anchor` setting \
             points elsewhere)",
            b.origin,
            log.url()
        ));
    };
    let (verdict, _) = verify::verify_anchor(log, &b.keys, &b.keys[b.keys.len() - 1..]).await.map_err(unreadable)?;
    let stale = match now.duration_since(written) {
        Ok(age) if age > max_age => Some(format!(
            "broker {} has stopped publishing: its checkpoint under {} was last written {} s ago, more than \
             --max-age {} s (a running broker writes it every anchor_heartbeat); check that it runs and can write \
             to the anchor",
            b.origin,
            log.url(),
            age.as_secs(),
            max_age.as_secs()
        )),
        Ok(_) => None,
        // Written "in the future": a clock far off, or a time set by hand
        // to make a dead broker look alive for ever.
        Err(e) if e.duration() > max_age => Some(format!(
            "broker {}: its checkpoint under {} was last written {} s in the future: the store's clock or the \
             object's time is wrong, so whether it still publishes cannot be told",
            b.origin,
            log.url(),
            e.duration().as_secs()
        )),
        Err(_) => None,
    };
    Ok((verdict, stale))
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
