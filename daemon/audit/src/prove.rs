//! Proofs against the latest checkpoint, for `grantline audit prove` (offline)
//! and the admin API's `Prove`.

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use grantline_proto::audit::checkpoint::{Checkpoint, InclusionReceipt};
use grantline_proto::audit::merkle;

use super::AuditStore;

/// What to prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The entry with this seq is in the checkpoint's tree.
    Inclusion(u64),
    /// The tree of this size is a prefix of the checkpoint's tree.
    Consistency(u64),
}

/// Builds the proof of `which` against the checkpoint `note`; returns the
/// proof text and the checkpoint's size.
pub fn prove(store: &AuditStore, note: &str, which: Which) -> Result<(String, u64)> {
    let body = grantline_proto::audit::note::body(note).context("the latest checkpoint is not a note")?;
    let cp = Checkpoint::parse_body(body).context("the latest checkpoint is malformed")?;
    match which {
        Which::Consistency(old) => {
            if old == 0 || old > cp.size {
                bail!("the old size must be between 1 and the latest checkpoint's size {}", cp.size);
            }
            // grantline/consistency-proof@v1: the sizes, the RFC 9162 proof
            // hashes, a blank line, and the newer checkpoint.
            let mut out = format!("grantline/consistency-proof@v1\nold {old}\nnew {}\n", cp.size);
            for h in merkle::consistency_proof(store, old, cp.size)? {
                out.push_str(&B64.encode(h));
                out.push('\n');
            }
            out.push('\n');
            out.push_str(note);
            Ok((out, cp.size))
        }
        Which::Inclusion(index) => {
            if index >= cp.size {
                bail!("entry {index} is not in the latest checkpoint (size {}); try again in a second", cp.size);
            }
            let proof = merkle::inclusion_proof(store, index, cp.size)?;
            Ok((InclusionReceipt { index, proof, checkpoint_note: note.to_owned() }.format(), cp.size))
        }
    }
}
