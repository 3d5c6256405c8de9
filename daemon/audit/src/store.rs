//! SQLite storage for the audit log: entries, the Merkle tree's complete
//! subtree hashes, and signed checkpoints. WAL, `synchronous=FULL`, and
//! triggers that refuse UPDATE and DELETE, so every table can only grow.

use std::path::Path;

use grantline_proto::audit::merkle::HashSource;
use grantline_proto::audit::{Entry, Event, Hash, StoredEntry};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::inventory::{self, GrantFilter, GrantRow, InventoryOp};

/// The columns of an entry row, each cut to a bound before SQLite hands it
/// over: a hostile database cannot make a reader allocate more than a
/// maximal entry per row. An oversized entry reads as one byte too long, so
/// the verifier names it as too large.
macro_rules! entry_columns {
    () => {
        "seq, CASE WHEN length(entry) <= 65535 THEN entry ELSE zeroblob(65536) END, \
         substr(hash, 1, 64), substr(signature, 1, 128)"
    };
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS entries (
    seq       INTEGER PRIMARY KEY,
    hash      BLOB NOT NULL,
    entry     BLOB NOT NULL,
    signature BLOB NOT NULL
) STRICT;
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'audit entries are append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'audit entries are append-only'); END;
CREATE TABLE IF NOT EXISTS tree_nodes (
    level INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    hash  BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) STRICT, WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS tree_nodes_no_update BEFORE UPDATE ON tree_nodes
BEGIN SELECT RAISE(ABORT, 'tree nodes are append-only'); END;
CREATE TRIGGER IF NOT EXISTS tree_nodes_no_delete BEFORE DELETE ON tree_nodes
BEGIN SELECT RAISE(ABORT, 'tree nodes are append-only'); END;
CREATE TABLE IF NOT EXISTS checkpoints (
    size    INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    note    TEXT NOT NULL
) STRICT;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_update BEFORE UPDATE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_delete BEFORE DELETE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
"#;

/// A complete Merkle subtree created by an append.
pub type NewNode = (u8, u64, Hash);

/// A signed entry ready to store.
pub struct NewEntry {
    pub seq: u64,
    pub hash: Hash,
    pub entry: Vec<u8>,
    pub signature: [u8; 64],
}

pub struct AuditStore {
    pub(crate) conn: Connection,
}

impl AuditStore {
    /// Opens (creating if needed) the audit database for writing.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(inventory::SCHEMA)?;
        let mut store = Self { conn };
        store.backfill_inventory()?;
        Ok(store)
    }

    /// Builds the inventory from the entries of a log written before it
    /// existed (`user_version` 0), once.
    fn backfill_inventory(&mut self) -> rusqlite::Result<()> {
        let version: i64 = self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version >= 1 {
            return Ok(());
        }
        let mut ops = Vec::new();
        let mut stmt = self.conn.prepare(
            "SELECT seq, entry FROM entries WHERE instr(entry, CAST('\"type\":\"grant\"' AS BLOB)) > 0
             OR instr(entry, CAST('\"type\":\"lease_revocation\"' AS BLOB)) > 0 ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        for row in rows {
            let (seq, bytes) = row?;
            let Ok(entry) = Entry::decode(&bytes) else { continue };
            if let Ok(event) = entry.event() {
                ops.extend(InventoryOp::of(u64::try_from(seq).unwrap_or(0), entry.time_ms, &event));
            }
        }
        drop(stmt);
        let tx = self.conn.transaction()?;
        inventory::apply(&tx, &ops)?;
        tx.pragma_update(None, "user_version", 1)?;
        tx.commit()
    }

    /// Writes everything in the WAL into the database file and empties the
    /// WAL (waiting, up to the busy timeout, for readers to step aside), so
    /// the file alone is the whole log.
    pub fn fold_wal(&self) -> rusqlite::Result<()> {
        let busy: i64 = self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy != 0 {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                Some("a reader kept the WAL from being folded in".into()),
            ));
        }
        Ok(())
    }

    /// Opens an audit database read-only, for verification.
    pub fn open_read_only(path: &Path) -> rusqlite::Result<Self> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self { conn })
    }

    /// Whether the database has a table named `name`.
    pub fn has_table(&self, name: &str) -> rusqlite::Result<bool> {
        self.conn.query_row("SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1", [name], |r| {
            r.get::<_, i64>(0).map(|n| n > 0)
        })
    }

    /// Up to `limit` stored checkpoints covering more than `after` entries
    /// (all, from size 0, for `None`), smallest first, as (size, note): read a page at a time, so that a
    /// log with millions of checkpoints is verified in bounded memory.
    pub fn checkpoints_after(&self, after: Option<u64>, limit: usize) -> anyhow::Result<Vec<(u64, String)>> {
        // Cut in bytes, not characters: a page holds at most 64 MiB of notes.
        // The first page starts below every key, so a negative size (which
        // no log writes) is read, and refused, rather than skipped.
        let mut stmt = self.conn.prepare_cached(
            "SELECT size, substr(CAST(note AS BLOB), 1, 65536) FROM checkpoints WHERE size >= ?1 ORDER BY size LIMIT ?2",
        )?;
        let after_key = after.map_or(i64::MIN, |a| i64::try_from(a).unwrap_or(i64::MAX).saturating_add(1));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(rusqlite::params![after_key, limit], |r| {
            // A note that is not UTF-8 reads as empty, which no check accepts.
            Ok((r.get::<_, i64>(0)?, String::from_utf8(r.get::<_, Vec<u8>>(1)?).unwrap_or_default()))
        })?;
        let mut page = Vec::with_capacity(limit.try_into().unwrap_or(0).min(4096));
        for row in rows {
            let (size, note) = row?;
            let Ok(size) = u64::try_from(size) else {
                anyhow::bail!(
                    "a stored checkpoint has the negative size {size}, which no log writes: the database was crafted"
                );
            };
            page.push((size, note));
        }
        // Sizes must rise strictly from `after`: a corrupt index that hands
        // back a row already read must not loop the reader.
        let mut last = after;
        for (size, _) in &page {
            if last.is_some_and(|l| *size <= l) {
                anyhow::bail!(
                    "the checkpoints table returned size {size} after {}: the database is corrupt",
                    last.unwrap_or_default()
                );
            }
            last = Some(*size);
        }
        Ok(page)
    }

    /// The last entry, if any.
    pub fn last(&self) -> rusqlite::Result<Option<StoredEntry>> {
        self.conn
            .query_row(
                concat!("SELECT ", entry_columns!(), " FROM entries ORDER BY seq DESC LIMIT 1"),
                [],
                row_to_entry,
            )
            .optional()
    }

    pub fn first(&self) -> rusqlite::Result<Option<StoredEntry>> {
        self.conn
            .query_row(concat!("SELECT ", entry_columns!(), " FROM entries ORDER BY seq ASC LIMIT 1"), [], row_to_entry)
            .optional()
    }

    pub fn count(&self) -> rusqlite::Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM entries", [], |r| r.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap_or(0))
    }

    /// Appends a batch of entries and the tree nodes they complete in one
    /// transaction: all or nothing, durable on return.
    pub fn append(&mut self, batch: &[NewEntry], nodes: &[NewNode]) -> rusqlite::Result<()> {
        self.append_with_inventory(batch, nodes, &[])
    }

    /// Appends like `append`, and applies the batch's inventory changes in
    /// the same transaction.
    pub fn append_with_inventory(
        &mut self,
        batch: &[NewEntry],
        nodes: &[NewNode],
        inventory: &[InventoryOp],
    ) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        inventory::apply(&tx, inventory)?;
        {
            let mut stmt =
                tx.prepare_cached("INSERT INTO entries (seq, hash, entry, signature) VALUES (?1, ?2, ?3, ?4)")?;
            for e in batch {
                stmt.execute(params![
                    i64::try_from(e.seq).unwrap_or(i64::MAX),
                    &e.hash[..],
                    &e.entry,
                    &e.signature[..]
                ])?;
            }
            let mut stmt = tx.prepare_cached("INSERT INTO tree_nodes (level, idx, hash) VALUES (?1, ?2, ?3)")?;
            for (level, idx, hash) in nodes {
                stmt.execute(params![level, i64::try_from(*idx).unwrap_or(i64::MAX), &hash[..]])?;
            }
        }
        tx.commit()
    }

    /// How many leaves the stored tree holds.
    pub fn tree_size(&self) -> rusqlite::Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM tree_nodes WHERE level = 0", [], |r| r.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap_or(0))
    }

    /// Entry hashes from `seq` on, in order.
    pub fn hashes_from(&self, seq: u64) -> rusqlite::Result<Vec<Hash>> {
        let mut stmt = self.conn.prepare("SELECT hash FROM entries WHERE seq >= ?1 ORDER BY seq")?;
        let rows = stmt.query_map([i64::try_from(seq).unwrap_or(i64::MAX)], |r| r.get::<_, Vec<u8>>(0))?;
        rows.map(|r| r.map(|h| h.try_into().unwrap_or([0; 32]))).collect()
    }

    /// The log's keys in order, with the seq that introduced each: the
    /// genesis key, then every rotation's (a byte search finds the few
    /// rotation entries without decoding every event).
    pub fn key_chain(&self) -> anyhow::Result<Vec<(u64, String)>> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, entry FROM entries WHERE seq = 0 OR instr(entry, CAST('\"type\":\"key_rotation\"' AS BLOB)) > 0 ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        let mut chain = Vec::new();
        for row in rows {
            let (seq, bytes) = row?;
            let entry = Entry::decode(&bytes)?;
            match entry.event()? {
                Event::Genesis { vkey, .. } if seq == 0 => chain.push((0, vkey)),
                Event::KeyRotation { new_vkey } => chain.push((u64::try_from(seq).unwrap_or(0), new_vkey)),
                _ => {}
            }
        }
        Ok(chain)
    }

    /// The stored row at `seq`.
    pub fn entry_at(&self, seq: u64) -> rusqlite::Result<StoredEntry> {
        self.conn.query_row(
            concat!("SELECT ", entry_columns!(), " FROM entries WHERE seq = ?1"),
            [i64::try_from(seq).unwrap_or(i64::MAX)],
            row_to_entry,
        )
    }

    /// Entry bytes with seq in `[start, end)`.
    pub fn entries_range(&self, start: u64, end: u64) -> rusqlite::Result<Vec<Vec<u8>>> {
        let mut stmt =
            self.conn.prepare_cached("SELECT entry FROM entries WHERE seq >= ?1 AND seq < ?2 ORDER BY seq")?;
        let rows = stmt.query_map(
            params![i64::try_from(start).unwrap_or(i64::MAX), i64::try_from(end).unwrap_or(i64::MAX)],
            |r| r.get(0),
        )?;
        rows.collect()
    }

    /// Stored tree nodes of `level` with index in `[start, end)`.
    pub fn nodes_range(&self, level: u8, start: u64, end: u64) -> rusqlite::Result<Vec<Hash>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT hash FROM tree_nodes WHERE level = ?1 AND idx >= ?2 AND idx < ?3 ORDER BY idx")?;
        let rows = stmt.query_map(
            params![level, i64::try_from(start).unwrap_or(i64::MAX), i64::try_from(end).unwrap_or(i64::MAX)],
            |r| r.get::<_, Vec<u8>>(0),
        )?;
        rows.map(|r| r.map(|h| h.try_into().unwrap_or([0; 32]))).collect()
    }

    pub fn add_checkpoint(&self, size: u64, time_ms: i64, note: &str) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO checkpoints (size, time_ms, note) VALUES (?1, ?2, ?3)",
            params![i64::try_from(size).unwrap_or(i64::MAX), time_ms, note],
        )?;
        Ok(())
    }

    /// The latest checkpoint note, if any.
    pub fn latest_checkpoint(&self) -> rusqlite::Result<Option<String>> {
        self.conn.query_row("SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1", [], |r| r.get(0)).optional()
    }

    /// Every stored checkpoint note, smallest tree first.
    pub fn checkpoints(&self) -> rusqlite::Result<Vec<String>> {
        // A note is a few hundred bytes; a longer one is cut and then fails
        // to verify rather than filling memory.
        let mut stmt = self.conn.prepare("SELECT substr(note, 1, 65536) FROM checkpoints ORDER BY size")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    }

    /// Calls `f` for every entry in seq order, stopping at its first error.
    pub fn for_each<E>(&self, mut f: impl FnMut(StoredEntry) -> Result<(), E>) -> Result<rusqlite::Result<()>, E> {
        let mut stmt = match self.conn.prepare(concat!("SELECT ", entry_columns!(), " FROM entries ORDER BY seq ASC")) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let rows = match stmt.query_map([], row_to_entry) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        for row in rows {
            match row {
                Ok(r) => f(r)?,
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(()))
    }
}

impl AuditStore {
    /// Grants in the inventory, soonest expiry first.
    pub fn grants(&self, f: &GrantFilter, now: i64) -> rusqlite::Result<Vec<GrantRow>> {
        inventory::grants(&self.conn, f, now)
    }

    /// Drops inventory rows that expired more than a day ago.
    pub fn prune_inventory(&self, now: i64) -> rusqlite::Result<usize> {
        inventory::prune(&self.conn, now)
    }

    /// Entries with seq in `[start, end)`, at most `limit`, in order.
    pub fn stored_range(&self, start: u64, end: u64, limit: usize) -> rusqlite::Result<Vec<StoredEntry>> {
        let mut stmt = self.conn.prepare_cached(concat!(
            "SELECT ",
            entry_columns!(),
            " FROM entries WHERE seq >= ?1 AND seq < ?2 ORDER BY seq LIMIT ?3"
        ))?;
        let rows = stmt.query_map(
            params![
                i64::try_from(start).unwrap_or(i64::MAX),
                i64::try_from(end).unwrap_or(i64::MAX),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            row_to_entry,
        )?;
        rows.collect()
    }
}

/// Tree nodes come straight from SQLite for proofs and for resuming.
impl HashSource for AuditStore {
    type Error = rusqlite::Error;
    fn node(&self, level: u8, index: u64) -> rusqlite::Result<Hash> {
        let hash: Vec<u8> = self.conn.query_row(
            "SELECT hash FROM tree_nodes WHERE level = ?1 AND idx = ?2",
            params![level, i64::try_from(index).unwrap_or(i64::MAX)],
            |r| r.get(0),
        )?;
        hash.try_into().map_err(|_| rusqlite::Error::InvalidColumnType(0, "hash".into(), rusqlite::types::Type::Blob))
    }
}

fn row_to_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEntry> {
    Ok(StoredEntry { seq: r.get(0)?, entry: r.get(1)?, hash: r.get(2)?, signature: r.get(3)? })
}

#[cfg(test)]
mod tests;
