//! `grantline audit verify`: reads an audit database and checks it with the
//! pure verifier in `grantline_proto::audit::verify`.

use std::path::Path;

use anyhow::{Context, Result};
use grantline_proto::audit::{ChainVerifier, Failure, Summary, VerifierKey};

use crate::audit::AuditStore;

/// Verifies the log in `db` under `key`. The outer error is "could not read";
/// the inner result is the verdict.
pub fn verify_db(db: &Path, key: &VerifierKey, progress: bool) -> Result<Result<Summary, Failure>> {
    if !db.exists() {
        anyhow::bail!("audit database {} does not exist", db.display());
    }
    let store =
        AuditStore::open_read_only(db).with_context(|| format!("cannot open audit database {}", db.display()))?;
    let total = store.count().with_context(|| format!("{} is not a Grantline audit database", db.display()))?;
    let bar = if progress && total >= 10_000 {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("verifying {bar:40} {pos}/{len} entries ({per_sec}, eta {eta})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };
    let mut verifier = ChainVerifier::new(key.clone());
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
    match walked {
        Err(failure) => Ok(Err(failure)),
        Ok(read) => {
            read.with_context(|| format!("cannot read {}", db.display()))?;
            Ok(verifier.finish())
        }
    }
}
