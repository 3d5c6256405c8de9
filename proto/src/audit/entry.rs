//! The canonical audit entry encoding, version 1 (RFD 0002).
//!
//! ```text
//! magic    "grantline/audit-entry\n"        22 bytes
//! version  0x01                              1 byte
//! origin   u16 big-endian length, UTF-8      the log's name (= signing key name)
//! seq      u64 big-endian                    0, 1, 2, ... with no gaps
//! time     i64 big-endian                    Unix milliseconds, never decreasing
//! prev     32 bytes                          hash of entry seq-1 (zeros for seq 0)
//! event    u32 big-endian length, JSON       the event (see `event.rs`)
//! ```
//!
//! The entry hash is the RFC 6962 leaf hash SHA-256(0x00 || bytes), so the same
//! entries form the leaves of the log's Merkle tree. The broker signs the bytes
//! with ed25519; that signature is the receipt an agent receives. A signed-note
//! body starts with its origin line, and `grantline/audit-entry` is refused as an
//! origin (see [`super::key::check_origin`]), so an entry signature can never be
//! passed off as a checkpoint signature.

use sha2::{Digest, Sha256};

use super::event::Event;

pub const MAGIC: &[u8] = b"grantline/audit-entry\n";
pub const VERSION: u8 = 1;
pub type Hash = [u8; 32];
pub const ZERO_HASH: Hash = [0; 32];
/// Entries are small (an event is a few hundred bytes). The bound is what a
/// tlog-tiles entry bundle can carry (u16 lengths), and it bounds the damage a
/// hostile file can do to a verifier.
pub const MAX_ENTRY_LEN: usize = u16::MAX as usize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("entry is {0} bytes, larger than the {MAX_ENTRY_LEN}-byte limit")]
    TooLarge(usize),
    #[error("entry does not start with the grantline audit entry magic")]
    BadMagic,
    #[error("entry version {0} is not supported (this build reads version {VERSION})")]
    BadVersion(u8),
    #[error("entry is truncated in its {0} field")]
    Truncated(&'static str),
    #[error("entry has {0} bytes after its event")]
    Trailing(usize),
    #[error("entry origin is not UTF-8")]
    OriginNotUtf8,
    #[error("entry event is not valid: {0}")]
    BadEvent(String),
}

/// A decoded entry, borrowing its event bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub origin: &'a str,
    pub seq: u64,
    pub time_ms: i64,
    pub prev: Hash,
    pub event_json: &'a [u8],
}

impl<'a> Entry<'a> {
    /// Encodes an entry. The event is serialized here so that every writer
    /// produces the same bytes for the same event.
    pub fn encode(origin: &str, seq: u64, time_ms: i64, prev: &Hash, event: &Event) -> Vec<u8> {
        let json = serde_json::to_vec(event).unwrap_or_default();
        let origin_len = u16::try_from(origin.len()).unwrap_or(u16::MAX);
        let origin = &origin.as_bytes()[..usize::from(origin_len)];
        let event_len = u32::try_from(json.len()).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(MAGIC.len() + 1 + 2 + origin.len() + 8 + 8 + 32 + 4 + json.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&origin_len.to_be_bytes());
        out.extend_from_slice(origin);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&time_ms.to_be_bytes());
        out.extend_from_slice(prev);
        out.extend_from_slice(&event_len.to_be_bytes());
        out.extend_from_slice(&json);
        out
    }

    /// [`Entry::encode`] of the event cut to its bounds ([`Event::bounded`]),
    /// refused if it is still larger than [`MAX_ENTRY_LEN`]: what a writer
    /// must use, so that every entry it signs can be stored, verified and
    /// published.
    pub fn encode_bounded(
        origin: &str,
        seq: u64,
        time_ms: i64,
        prev: &Hash,
        event: Event,
    ) -> Result<Vec<u8>, EntryError> {
        let bytes = Self::encode(origin, seq, time_ms, prev, &event.bounded());
        if bytes.len() > MAX_ENTRY_LEN {
            return Err(EntryError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// Decodes the fixed fields of an entry strictly; the event JSON is parsed
    /// by [`Entry::event`].
    pub fn decode(bytes: &'a [u8]) -> Result<Self, EntryError> {
        if bytes.len() > MAX_ENTRY_LEN {
            return Err(EntryError::TooLarge(bytes.len()));
        }
        let mut r = Reader(bytes);
        if r.take(MAGIC.len(), "magic").map_err(|_| EntryError::BadMagic)? != MAGIC {
            return Err(EntryError::BadMagic);
        }
        let version = r.take(1, "version")?[0];
        if version != VERSION {
            return Err(EntryError::BadVersion(version));
        }
        let origin_len = usize::from(u16::from_be_bytes(r.array("origin length")?));
        let origin = std::str::from_utf8(r.take(origin_len, "origin")?).map_err(|_| EntryError::OriginNotUtf8)?;
        let seq = u64::from_be_bytes(r.array("seq")?);
        let time_ms = i64::from_be_bytes(r.array("time")?);
        let prev: Hash = r.array("prev hash")?;
        let event_len = u32::from_be_bytes(r.array("event length")?) as usize;
        let event_json = r.take(event_len, "event")?;
        if !r.0.is_empty() {
            return Err(EntryError::Trailing(r.0.len()));
        }
        Ok(Self { origin, seq, time_ms, prev, event_json })
    }

    pub fn event(&self) -> Result<Event, EntryError> {
        serde_json::from_slice(self.event_json).map_err(|e| EntryError::BadEvent(e.to_string()))
    }
}

/// The entry hash: the RFC 6962 leaf hash of the entry bytes.
pub fn leaf_hash(bytes: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(bytes);
    h.finalize().into()
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], EntryError> {
        if self.0.len() < n {
            return Err(EntryError::Truncated(field));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], EntryError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event::Genesis { vkey: "k+00000000+AA".into(), software: "test".into() }
    }

    #[test]
    fn round_trip() {
        let prev = [7u8; 32];
        let bytes = Entry::encode("o.example/log", 42, 1_700_000_000_000, &prev, &event());
        let e = Entry::decode(&bytes).unwrap();
        assert_eq!(e.origin, "o.example/log");
        assert_eq!(e.seq, 42);
        assert_eq!(e.time_ms, 1_700_000_000_000);
        assert_eq!(e.prev, prev);
        assert_eq!(e.event().unwrap(), event());
    }

    #[test]
    fn every_truncation_and_extension_is_rejected() {
        let bytes = Entry::encode("o", 1, 2, &ZERO_HASH, &event());
        for n in 0..bytes.len() {
            assert!(Entry::decode(&bytes[..n]).is_err(), "prefix of {n} bytes accepted");
        }
        let mut longer = bytes.clone();
        longer.push(b' ');
        assert_eq!(Entry::decode(&longer), Err(EntryError::Trailing(1)));
        let mut v2 = bytes.clone();
        v2[MAGIC.len()] = 2;
        assert_eq!(Entry::decode(&v2), Err(EntryError::BadVersion(2)));
    }

    #[test]
    fn leaf_hash_is_rfc6962() {
        // RFC 6962 leaf hash of the empty string: SHA-256(0x00).
        assert_eq!(hex::encode(leaf_hash(b"")), "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d");
    }
}
