//! C2SP tlog-checkpoint bodies (c2sp.org/tlog-checkpoint) and offline
//! inclusion proofs in the C2SP tlog-proof form (c2sp.org/tlog-proof).
//!
//! ```text
//! <origin>\n<tree size, decimal>\n<base64 root hash>\n[extension lines]
//! ```

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use super::entry::Hash;
use super::key::{SignerKey, VerifierKey};
use super::merkle;
use super::note::{self, NoteError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Note(#[from] NoteError),
    #[error("malformed checkpoint: {0}")]
    Malformed(String),
    #[error("checkpoint is for log {found:?}, not {expected:?}")]
    WrongOrigin { found: String, expected: String },
}

impl Checkpoint {
    pub fn body(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root))
    }

    /// Signs the checkpoint as a note.
    pub fn sign(&self, key: &SignerKey) -> Result<String, NoteError> {
        note::sign(&self.body(), key)
    }

    /// Parses a checkpoint body (extension lines are allowed and ignored).
    pub fn parse_body(body: &str) -> Result<Self, CheckpointError> {
        let bad = |m: &str| CheckpointError::Malformed(m.into());
        let mut lines = body.strip_suffix('\n').ok_or_else(|| bad("no final newline"))?.split('\n');
        let origin = lines.next().filter(|o| !o.is_empty()).ok_or_else(|| bad("no origin line"))?;
        let size = lines.next().ok_or_else(|| bad("no tree size line"))?;
        if size.is_empty() || (size.len() > 1 && size.starts_with('0')) || !size.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the tree size is not a decimal number without leading zeros"));
        }
        let size: u64 = size.parse().map_err(|_| bad("the tree size does not fit 64 bits"))?;
        let root = lines.next().ok_or_else(|| bad("no root hash line"))?;
        let root: Hash = B64
            .decode(root)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| bad("the root hash is not 32 base64-encoded bytes"))?;
        if lines.any(str::is_empty) {
            return Err(bad("an empty extension line"));
        }
        Ok(Self { origin: origin.to_owned(), size, root })
    }

    /// Opens a signed checkpoint of the log named by `key`.
    pub fn open(text: &str, key: &VerifierKey) -> Result<Self, CheckpointError> {
        Self::open_any(text, std::slice::from_ref(key))
    }

    /// Opens a signed checkpoint signed by any of `keys` (which all name the
    /// same log: key rotation keeps the origin).
    pub fn open_any(text: &str, keys: &[VerifierKey]) -> Result<Self, CheckpointError> {
        let opened = note::open(text, keys)?;
        let cp = Self::parse_body(opened.body)?;
        if let Some(k) = keys.first() {
            if cp.origin != k.name() {
                return Err(CheckpointError::WrongOrigin { found: cp.origin, expected: k.name().to_owned() });
            }
        }
        Ok(cp)
    }
}

const PROOF_HEADER: &str = "c2sp.org/tlog-proof@v1";

/// An offline proof that entry `index` is in the log: its inclusion proof and
/// the signed checkpoint it is proved against (c2sp.org/tlog-proof).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InclusionReceipt {
    pub index: u64,
    pub proof: Vec<Hash>,
    pub checkpoint_note: String,
}

impl InclusionReceipt {
    pub fn format(&self) -> String {
        let mut out = format!("{PROOF_HEADER}\nindex {}\n", self.index);
        for h in &self.proof {
            out.push_str(&B64.encode(h));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&self.checkpoint_note);
        out
    }

    pub fn parse(text: &str) -> Result<Self, CheckpointError> {
        let bad = |m: &str| CheckpointError::Malformed(format!("tlog-proof: {m}"));
        let rest = text
            .strip_prefix(PROOF_HEADER)
            .and_then(|r| r.strip_prefix('\n'))
            .ok_or_else(|| bad("no c2sp.org/tlog-proof@v1 header"))?;
        let rest = match rest.strip_prefix("extra ") {
            Some(r) => r.split_once('\n').ok_or_else(|| bad("truncated extra line"))?.1,
            None => rest,
        };
        let (index_line, mut rest) = rest.split_once('\n').ok_or_else(|| bad("no index line"))?;
        let index = index_line.strip_prefix("index ").ok_or_else(|| bad("no index line"))?;
        if index.is_empty() || (index.len() > 1 && index.starts_with('0')) || !index.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad("the index is not a decimal number without leading zeros"));
        }
        let index = index.parse().map_err(|_| bad("the index does not fit 64 bits"))?;
        let mut proof = Vec::new();
        loop {
            let (line, after) = rest.split_once('\n').ok_or_else(|| bad("no blank line before the checkpoint"))?;
            rest = after;
            if line.is_empty() {
                break;
            }
            let h: Hash = B64
                .decode(line)
                .ok()
                .and_then(|h| h.try_into().ok())
                .ok_or_else(|| bad("a proof line is not a base64 SHA-256 hash"))?;
            proof.push(h);
            if proof.len() > 64 {
                return Err(bad("more than 64 proof hashes"));
            }
        }
        Ok(Self { index, proof, checkpoint_note: rest.to_owned() })
    }

    /// Checks the proof for the entry with `leaf` hash against its checkpoint.
    pub fn verify(&self, leaf: &Hash, keys: &[VerifierKey]) -> Result<Checkpoint, CheckpointError> {
        let cp = Checkpoint::open_any(&self.checkpoint_note, keys)?;
        if !merkle::verify_inclusion(leaf, self.index, cp.size, &self.proof, &cp.root) {
            return Err(CheckpointError::Malformed(format!(
                "the inclusion proof for index {} does not lead to the root of the checkpoint of size {}",
                self.index, cp.size
            )));
        }
        Ok(cp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::entry::leaf_hash;
    use crate::audit::merkle::{inclusion_proof, root, MemoryTree};

    #[test]
    fn checkpoint_round_trip_and_rejections() {
        let key = SignerKey::generate("grantline.test/log").unwrap();
        let cp = Checkpoint { origin: "grantline.test/log".into(), size: 42, root: [7; 32] };
        let signed = cp.sign(&key).unwrap();
        assert!(signed.starts_with("grantline.test/log\n42\nBwcH"));
        assert_eq!(Checkpoint::open(&signed, key.verifier()).unwrap(), cp);
        for body in [
            "o\n042\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
            "o\n1\nAAAA\n",
            "\n1\nx\n",
            "o\n-1\nx\n",
            "o\n1\n",
        ] {
            assert!(Checkpoint::parse_body(body).is_err(), "{body:?}");
        }
        let other = SignerKey::generate("grantline.test/other").unwrap();
        let foreign = Checkpoint { origin: "grantline.test/other".into(), ..cp.clone() }.sign(&other).unwrap();
        assert!(Checkpoint::open(&foreign, key.verifier()).is_err());
        // A receipt (a signed binary entry) is not a checkpoint.
        assert!(Checkpoint::open("grantline/audit-entry\n\u{1}\u{0}", key.verifier()).is_err());
    }

    #[test]
    fn tlog_proof_round_trip_and_verify() {
        let key = SignerKey::generate("grantline.test/log").unwrap();
        let mut t = MemoryTree::default();
        let leaves: Vec<Hash> = (0..37).map(|i| leaf_hash(format!("e{i}").as_bytes())).collect();
        for l in &leaves {
            t.push(*l);
        }
        let cp = Checkpoint { origin: "grantline.test/log".into(), size: 37, root: root(&t, 37).unwrap() };
        let r = InclusionReceipt {
            index: 21,
            proof: inclusion_proof(&t, 21, 37).unwrap(),
            checkpoint_note: cp.sign(&key).unwrap(),
        };
        let text = r.format();
        assert!(text.starts_with("c2sp.org/tlog-proof@v1\nindex 21\n"));
        let parsed = InclusionReceipt::parse(&text).unwrap();
        assert_eq!(parsed, r);
        assert_eq!(parsed.verify(&leaves[21], &[key.verifier().clone()]).unwrap(), cp);
        assert!(parsed.verify(&leaves[20], &[key.verifier().clone()]).is_err());
        assert!(InclusionReceipt::parse(&text.replace("index 21", "index 021")).is_err());
        assert!(InclusionReceipt::parse("c2sp.org/tlog-proof@v1\nindex 1\n").is_err());
    }
}
