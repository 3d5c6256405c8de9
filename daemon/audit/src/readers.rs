//! Read-only connections to the audit database, shared by the broker's
//! proofs and admin reads.

use std::path::Path;

use crate::store::AuditStore;

/// Read-only connections to the audit database, one per core: inclusion
/// proofs (agents ask for one after every grant) and admin reads run side
/// by side instead of queueing on one connection (RFD 0008).
pub struct AuditReaders {
    pool: Vec<std::sync::Mutex<AuditStore>>,
    next: std::sync::atomic::AtomicUsize,
}

impl AuditReaders {
    pub fn open(path: &Path, connections: usize) -> rusqlite::Result<Self> {
        let pool = (0..connections.max(1))
            .map(|_| AuditStore::open_read_only(path).map(std::sync::Mutex::new))
            .collect::<rusqlite::Result<_>>()?;
        Ok(Self { pool, next: std::sync::atomic::AtomicUsize::new(0) })
    }

    /// Runs `f` on an idle connection, or waits for one in turn. Call it
    /// from blocking code (`spawn_blocking`): SQLite reads block.
    pub fn with<T>(&self, f: impl FnOnce(&AuditStore) -> T) -> T {
        for reader in &self.pool {
            match reader.try_lock() {
                Ok(store) => return f(&store),
                Err(std::sync::TryLockError::Poisoned(p)) => return f(&p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.pool.len();
        let store = self.pool[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&store)
    }
}
