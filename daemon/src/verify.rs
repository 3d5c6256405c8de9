//! `grantline audit verify`: reads an audit database and checks it with the
//! pure verifier in `grantline_proto::audit::verify`, then checks every
//! checkpoint — those stored in the database and those given from outside
//! (an anchor, a copy kept by a security team) — against the entries.

use std::path::Path;

use anyhow::{Context, Result};
use grantline_proto::audit::checkpoint::Checkpoint;
use grantline_proto::audit::{ChainVerifier, Failure, Summary, VerifierKey};

use crate::audit::AuditStore;

/// Verifies the log in `db` under `key`, and the signed checkpoints in it and
/// in `external`. The outer error is "could not read"; the inner result is the
/// verdict.
pub fn verify_db(
    db: &Path,
    key: &VerifierKey,
    progress: bool,
    external: &[String],
) -> Result<Result<Summary, Failure>> {
    if !db.exists() {
        anyhow::bail!("audit database {} does not exist", db.display());
    }
    let store =
        AuditStore::open_read_only(db).with_context(|| format!("cannot open audit database {}", db.display()))?;
    let total = store.count().with_context(|| format!("{} is not a Grantline audit database", db.display()))?;
    // Checkpoints are read first for their sizes (so the walk records the
    // roots to compare) and their signatures checked after the entries, so
    // that a bad entry is reported before a checkpoint that disagrees with it.
    let mut notes: Vec<(String, String)> =
        external.iter().enumerate().map(|(i, n)| (format!("given checkpoint #{}", i + 1), n.clone())).collect();
    // A database from before checkpoints existed has no such table: no checkpoints.
    notes.extend(store.checkpoints().unwrap_or_default().into_iter().map(|n| ("stored checkpoint".to_owned(), n)));
    let mut unverified = Vec::new();
    for (what, note) in &notes {
        let body = grantline_proto::audit::note::body(note).unwrap_or_default();
        match Checkpoint::parse_body(body) {
            Ok(cp) => unverified.push((what, note, cp.size)),
            Err(e) => return Ok(Err(Failure { seq: -1, reason: format!("a {what} is not usable: {e}") })),
        }
    }
    let bar = (progress && total >= 10_000).then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("verifying {bar:40} {pos}/{len} entries ({per_sec}, eta {eta})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut verifier = ChainVerifier::new(key.clone());
    for (_, _, size) in &unverified {
        verifier.want_root_at(*size);
    }
    let mut n = 0u64;
    let walked = store.for_each(|row| {
        n += 1;
        if let Some(b) = &bar {
            if n.is_multiple_of(4096) {
                b.set_position(n);
            }
        }
        verifier.push(row)
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let summary = match walked {
        Err(failure) => return Ok(Err(failure)),
        Ok(read) => {
            read.with_context(|| format!("cannot read {}", db.display()))?;
            match verifier.finish() {
                Ok(s) => s,
                Err(f) => return Ok(Err(f)),
            }
        }
    };
    let mut checkpoints = Vec::new();
    for (what, note, size) in unverified {
        match Checkpoint::open(note, key) {
            Ok(cp) => checkpoints.push((what, cp)),
            Err(e) => {
                let seq = i64::try_from(size).unwrap_or(i64::MAX);
                return Ok(Err(Failure { seq, reason: format!("a {what} of size {size} does not verify: {e}") }));
            }
        }
    }
    checkpoints.sort_by_key(|(_, cp)| cp.size);
    for (what, cp) in &checkpoints {
        let Some(root) = summary.roots.get(&cp.size) else {
            return Ok(Err(Failure {
                seq: i64::try_from(summary.entries).unwrap_or(i64::MAX),
                reason: format!(
                    "the log ends after {} entries but a {what} signed by the log covers {}: entries were truncated or the log was rolled back",
                    summary.entries, cp.size
                ),
            }));
        };
        if *root != cp.root {
            return Ok(Err(Failure {
                seq: i64::try_from(cp.size).unwrap_or(i64::MAX) - 1,
                reason: format!(
                    "fork: a {what} signed by the log gives the first {} entries the root {}, but they hash to {}",
                    cp.size,
                    hex::encode(cp.root),
                    hex::encode(root)
                ),
            }));
        }
    }
    Ok(Ok(summary))
}
