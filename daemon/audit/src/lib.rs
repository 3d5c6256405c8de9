//! The audit log's shells: SQLite storage and the single writer task, the
//! anchor publisher, inclusion proofs and the offline verifier. The formats
//! and checks are in `grantline_proto::audit`. Shared by the broker and the
//! `grantline` CLI, which links no QUIC, Vault or gRPC server code.
#![forbid(unsafe_code)]

use std::path::Path;

use anyhow::{Context, Result};

pub mod anchor;
pub mod fleet;
pub mod fleet_anchor;
pub mod inventory;
pub mod prove;
pub mod publisher;
mod readers;
pub mod store;
mod untrusted;
pub mod verify;
pub mod writer;

pub use readers::AuditReaders;
pub use store::AuditStore;
pub use writer::{AuditError, AuditLog, Endorsement};

/// Takes the state directory's lock (`grantlined.lock`), without waiting.
/// The broker holds it while it runs; offline tools take it to be sure no
/// broker writes the log under them.
pub fn lock_state_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("grantlined.lock"))
        .with_context(|| format!("cannot open {}", dir.join("grantlined.lock").display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| anyhow::anyhow!("the state directory is locked ({e})"))
}
