//! Verification of a stored audit log: encoding, entry hashes, the hash chain,
//! seq continuity, origin, time order and every signature.
//!
//! [`ChainVerifier`] is fed entries in storage order and reports the first bad
//! seq with its reason. Signatures are checked in batches (ed25519 batch
//! verification); when a batch fails, its entries are checked one by one so
//! the first bad one is named.

use ed25519_dalek::Signature;
use serde::Serialize;

use std::collections::BTreeMap;

use super::entry::{leaf_hash, Entry, Hash, ZERO_HASH};
use super::event::Event;
use super::key::VerifierKey;
use super::merkle::{self, Frontier};

/// One row as storage holds it.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    /// The seq storage files the entry under.
    pub seq: i64,
    pub entry: Vec<u8>,
    pub hash: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Why a log failed verification, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("seq {seq}: {reason}")]
pub struct Failure {
    pub seq: i64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub entries: u64,
    pub origin: String,
    /// Hash of the last entry, hex; the empty log's is all zeros.
    pub head: String,
    /// The Merkle tree root over all entries, hex.
    pub root: String,
    pub first_time_ms: Option<i64>,
    pub last_time_ms: Option<i64>,
    /// Merkle roots at the tree sizes asked for with [`ChainVerifier::want_root_at`].
    #[serde(skip)]
    pub roots: BTreeMap<u64, Hash>,
    /// The log's signing keys in order: the genesis key (one the caller
    /// trusts), then each rotation's. With signatures checked, every one is
    /// reached from the trusted genesis key by rotations that the key before
    /// it signed; without, only the genesis key is vouched for.
    #[serde(skip)]
    pub keys: Vec<VerifierKey>,
    /// The seq of the log's last key rotation when no entry follows it: the
    /// new key has signed nothing in the log yet, so only a checkpoint it
    /// signed can show the rotation is the broker's (a holder of the retired
    /// key could have written it). See [`ChainVerifier::trusting`].
    #[serde(skip)]
    pub unendorsed_rotation: Option<u64>,
}

/// Signatures per batch verification; each core gets one batch per flush.
const BATCH: usize = 1024;
const ROTATION_PREFIX: &[u8] = br#"{"type":"key_rotation""#;

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).min(8)
}

pub struct ChainVerifier {
    /// The keys the caller trusts: one of them must sign the genesis entry.
    /// Trust extends from there only through rotations signed by the key in
    /// force, so a key the log names for itself is never trusted on its word.
    trusted: Vec<VerifierKey>,
    /// The log's keys so far; the last one signs the next entry.
    keys: Vec<VerifierKey>,
    next_seq: u64,
    prev: Hash,
    last_time: i64,
    first_time: Option<i64>,
    pending: Vec<(i64, Vec<u8>, Signature, VerifierKey)>,
    /// Cores to verify signatures on.
    threads: usize,
    check_signatures: bool,
    tree: Frontier,
    wanted: BTreeMap<u64, Option<Hash>>,
    /// Seqs of the rotation entries, in order.
    rotated_at: Vec<i64>,
}

impl ChainVerifier {
    /// A verifier that trusts `key` alone: the log must have been started by it.
    pub fn new(key: VerifierKey) -> Self {
        Self::trusting(vec![key])
    }

    /// A verifier that trusts a key history, oldest first (`audit.vkeys`):
    /// its first key must have started the log and each of the log's
    /// rotations must name the next key of the history, up to its last (past
    /// it, a rotation the key in force signed extends trust as usual). A log
    /// that ends under an older key than the history's last is refused: a
    /// retired key may have leaked, so what only it signed proves nothing.
    pub fn trusting(keys: Vec<VerifierKey>) -> Self {
        Self {
            trusted: keys,
            keys: Vec::new(),
            next_seq: 0,
            prev: ZERO_HASH,
            last_time: i64::MIN,
            first_time: None,
            pending: Vec::with_capacity(BATCH * threads()),
            threads: threads(),
            check_signatures: true,
            tree: Frontier::default(),
            wanted: BTreeMap::new(),
            rotated_at: Vec::new(),
        }
    }

    /// Records the Merkle root when the tree reaches `size` entries (for
    /// checking checkpoints against the entries).
    pub fn want_root_at(&mut self, size: u64) {
        self.wanted.entry(size).or_insert(if size == 0 { Some(merkle::empty_root()) } else { None });
    }

    /// Entries pushed so far: the size of the tree over them.
    pub fn size(&self) -> u64 {
        self.next_seq
    }

    /// The Merkle root over the entries pushed so far.
    pub fn root(&self) -> Hash {
        self.tree.root()
    }

    /// The log's keys reached so far, genesis first (their rotations'
    /// signatures may still be pending: [`Self::flush_signatures`]).
    pub fn keys(&self) -> &[VerifierKey] {
        &self.keys
    }

    /// Checks every signature still pending, so that a failure found now by
    /// the caller (a checkpoint that disagrees) is reported after any earlier one.
    pub fn flush_signatures(&mut self) -> Result<(), Failure> {
        self.flush()
    }

    /// Checks the chain and hashes only (signatures are skipped). For speed
    /// measurements and for logs whose signatures were checked elsewhere.
    pub fn without_signatures(mut self) -> Self {
        self.check_signatures = false;
        self
    }

    /// Checks one more entry. On a structural failure, signatures still pending
    /// for earlier entries are checked first so that the earliest failure wins.
    pub fn push(&mut self, row: StoredEntry) -> Result<(), Failure> {
        if let Err(reason) = self.check_structure(&row) {
            self.flush()?;
            return Err(Failure { seq: row.seq, reason });
        }
        if self.check_signatures {
            let Ok(sig) = Signature::from_slice(&row.signature) else {
                self.flush()?;
                return Err(Failure {
                    seq: row.seq,
                    reason: format!("signature is {} bytes, not an ed25519 signature", row.signature.len()),
                });
            };
            let Some(signer) = self.signer_of(row.seq) else {
                return Err(Failure { seq: row.seq, reason: "no key is in force to sign this entry".into() });
            };
            self.pending.push((row.seq, row.entry, sig, signer));
            if self.pending.len() >= BATCH * self.threads {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// The key that signs the entry at `seq`: the one in force before it (a
    /// rotation entry is signed by the key it retires).
    fn signer_of(&self, seq: i64) -> Option<VerifierKey> {
        let in_force = if self.rotated_at.last() == Some(&seq) {
            self.keys.len().saturating_sub(2)
        } else {
            self.keys.len().saturating_sub(1)
        };
        // `check_structure` records the trusted genesis key before any
        // signature is queued, so there is always one.
        self.keys.get(in_force).cloned()
    }

    /// Checks the remaining signatures and summarizes the verified log.
    pub fn finish(mut self) -> Result<Summary, Failure> {
        self.flush()?;
        // An empty log has no genesis: nothing in it is signed, so it proves
        // nothing, not even that it belongs to the key given. A broker writes
        // its genesis at first start, so a real log is never empty.
        let Some(genesis) = self.keys.first() else {
            return Err(Failure {
                seq: 0,
                reason: "the log is empty: it has no genesis entry signed by the trusted key, so it proves \
                         nothing (a broker writes its genesis at first start; this log was never started or \
                         was emptied)"
                    .into(),
            });
        };
        if self.keys.len() < self.trusted.len() {
            let (last, wanted) = (&self.keys[self.keys.len() - 1], &self.trusted[self.keys.len()]);
            return Err(Failure {
                seq: i64::try_from(self.next_seq).unwrap_or(i64::MAX),
                reason: format!(
                    "the log ends under key {last}, but the key history given continues to {wanted}: this is an \
                     old copy of the log, or a log written with a retired key; verify a current copy"
                ),
            });
        }
        let unendorsed_rotation =
            self.rotated_at.last().and_then(|r| u64::try_from(*r).ok()).filter(|r| r + 1 == self.next_seq);
        Ok(Summary {
            entries: self.next_seq,
            origin: genesis.name().to_owned(),
            head: hex::encode(self.prev),
            root: hex::encode(self.tree.root()),
            first_time_ms: self.first_time,
            last_time_ms: self.first_time.map(|_| self.last_time),
            roots: self.wanted.into_iter().filter_map(|(k, v)| Some((k, v?))).collect(),
            keys: self.keys,
            unendorsed_rotation,
        })
    }

    fn check_structure(&mut self, row: &StoredEntry) -> Result<(), String> {
        let expected = self.next_seq;
        if row.seq != i64::try_from(expected).unwrap_or(i64::MAX) {
            return Err(if row.seq > i64::try_from(expected).unwrap_or(i64::MAX) {
                format!("gap in the log: expected seq {expected} next, found {} (entries deleted?)", row.seq)
            } else {
                format!(
                    "seq {} appears again after seq {} (duplicated or reordered entry)",
                    row.seq,
                    expected.saturating_sub(1)
                )
            });
        }
        let entry = Entry::decode(&row.entry).map_err(|e| format!("malformed entry: {e}"))?;
        let computed = leaf_hash(&row.entry);
        if row.hash.as_slice() != computed {
            return Err(format!(
                "stored hash {} does not match the entry's hash {} (entry edited?)",
                hex::encode(&row.hash),
                hex::encode(computed)
            ));
        }
        if entry.seq != expected {
            return Err(format!(
                "entry stored at seq {expected} says it is seq {} (entries moved or swapped)",
                entry.seq
            ));
        }
        let origin = self.keys.first().map_or_else(|| self.trusted_names(), |g| format!("{:?}", g.name()));
        let origin_ok = match self.keys.first() {
            Some(genesis) => entry.origin == genesis.name(),
            None => self.trusted.iter().any(|k| k.name() == entry.origin),
        };
        if !origin_ok {
            return Err(format!("entry is from log {:?}, not {origin}", entry.origin));
        }
        if entry.prev != self.prev {
            return Err(format!(
                "broken chain: entry links to {} but the previous entry's hash is {}",
                hex::encode(entry.prev),
                hex::encode(self.prev)
            ));
        }
        if entry.time_ms < self.last_time {
            return Err(format!("time goes backwards: {} ms after {} ms", entry.time_ms, self.last_time));
        }
        // Chain-only checks read an event only where it matters to the chain:
        // the genesis and key rotations. (serde writes the tag first, so a
        // rotation starts with it; a full check parses every event anyway.)
        let event = if self.check_signatures || expected == 0 || entry.event_json.starts_with(ROTATION_PREFIX) {
            entry.event().map_err(|e| e.to_string())?
        } else {
            Event::Denial {
                action: String::new(),
                node: String::new(),
                kind: String::new(),
                role: String::new(),
                policy: String::new(),
                reason: String::new(),
                caller: None,
            }
        };
        match (&event, expected) {
            (Event::Genesis { vkey, .. }, 0) => {
                let genesis = VerifierKey::parse(vkey).map_err(|e| format!("genesis names an unusable key: {e}"))?;
                if genesis.name() != entry.origin {
                    return Err(format!("genesis key {genesis} is not named for the log's origin {:?}", entry.origin));
                }
                if self.trusted.first() != Some(&genesis) {
                    let given: Vec<String> = self.trusted.iter().map(ToString::to_string).collect();
                    return Err(format!(
                        "log was started by key {genesis}, not by the key given ({}): it is another log, or a \
                         forgery; if the broker rotated its key since, verify with the key history \
                         (STATE_DIR/audit.vkeys), whose first key started the log",
                        given.join(", ")
                    ));
                }
                self.keys.push(genesis);
            }
            (Event::Genesis { .. }, _) => return Err("a second genesis entry".into()),
            (_, 0) => return Err(format!("first entry is a {} event, not genesis", event.type_name())),
            (Event::KeyRotation { new_vkey }, _) => {
                let new =
                    VerifierKey::parse(new_vkey).map_err(|e| format!("key rotation names an unusable key: {e}"))?;
                if new.name() != entry.origin {
                    return Err(format!(
                        "key rotation to {new}, which is not named for the log's origin {:?}",
                        entry.origin
                    ));
                }
                if self.keys.contains(&new) {
                    return Err(format!("key rotation to {new}, a key this log already used"));
                }
                if let Some(next) = self.trusted.get(self.keys.len()) {
                    if *next != new {
                        return Err(format!(
                            "key rotation to {new}, but the key history given says the next key is {next}: a \
                             retired key forked the log here"
                        ));
                    }
                }
                self.keys.push(new);
                self.rotated_at.push(row.seq);
            }
            _ => {}
        }
        self.first_time.get_or_insert(entry.time_ms);
        self.last_time = entry.time_ms;
        self.prev = computed;
        self.next_seq += 1;
        self.tree.push(computed);
        if let Some(slot) = self.wanted.get_mut(&self.next_seq) {
            *slot = Some(self.tree.root());
        }
        Ok(())
    }

    fn trusted_names(&self) -> String {
        let names: Vec<String> = self.trusted.iter().map(|k| format!("{:?}", k.name())).collect();
        names.join(" or ")
    }

    /// Verifies the pending signatures, one batch per core, and names the
    /// earliest bad one.
    fn flush(&mut self) -> Result<(), Failure> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let chunks: Vec<&[Pending]> = pending.chunks(BATCH).collect();
        let first_bad = if chunks.len() == 1 {
            verify_chunk(chunks[0])
        } else {
            std::thread::scope(|s| {
                let (last, others) = chunks.split_last().unwrap_or((&chunks[0], &[]));
                let handles: Vec<_> = others
                    .iter()
                    .enumerate()
                    .map(|(i, c)| s.spawn(move || verify_chunk(c).map(|at| i * BATCH + at)))
                    .collect();
                // This thread takes the last chunk instead of waiting idle.
                let mine = verify_chunk(last).map(|at| others.len() * BATCH + at);
                // Chunks are in seq order, so the first failing chunk holds the earliest failure.
                handles.into_iter().map(|h| h.join().unwrap_or(Some(0))).chain(std::iter::once(mine)).find_map(|r| r)
            })
        };
        if let Some(i) = first_bad {
            let (seq, _, _, key) = &pending[i.min(pending.len() - 1)];
            return Err(Failure {
                seq: *seq,
                reason: format!("signature does not verify under key {key} (wrong key or forged entry)"),
            });
        }
        self.pending = pending;
        self.pending.clear();
        Ok(())
    }
}

type Pending = (i64, Vec<u8>, Signature, VerifierKey);

/// Batch-verifies a chunk; on failure, checks one by one and returns the
/// position in the chunk of the first bad signature.
fn verify_chunk(chunk: &[Pending]) -> Option<usize> {
    let msgs: Vec<&[u8]> = chunk.iter().map(|(_, m, _, _)| m.as_slice()).collect();
    let sigs: Vec<Signature> = chunk.iter().map(|(_, _, s, _)| *s).collect();
    let keys: Vec<_> = chunk.iter().map(|(_, _, _, k)| *k.key()).collect();
    if ed25519_dalek::verify_batch(&msgs, &sigs, &keys).is_ok() {
        return None;
    }
    Some(chunk.iter().position(|(_, msg, sig, key)| key.key().verify_strict(msg, sig).is_err()).unwrap_or(0))
}

#[cfg(test)]
mod tests;
