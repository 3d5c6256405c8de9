//! The audit log's pure core: entry encoding, events, keys in the C2SP
//! signed-note formats, receipts and verification of the hash chain.
//! Storage (SQLite) and the writer task live in the daemon.

pub mod checkpoint;
pub mod entry;
pub mod event;
pub mod key;
pub mod merkle;
pub mod note;
pub mod receipt;
pub mod tiles;
pub mod verify;

pub use entry::{Entry, EntryError, Hash, ZERO_HASH};
pub use event::Event;
pub use key::{KeyError, SignerKey, VerifierKey};
pub use verify::{ChainVerifier, Failure, StoredEntry, Summary};
