//! SQLite storage for the audit log: entries, the Merkle tree's complete
//! subtree hashes, and signed checkpoints. WAL, `synchronous=FULL`, and
//! triggers that refuse UPDATE and DELETE, so every table can only grow.

use std::path::Path;

use grantline_proto::audit::merkle::HashSource;
use grantline_proto::audit::{Entry, Event, Hash, StoredEntry};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

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
    conn: Connection,
}

impl AuditStore {
    /// Opens (creating if needed) the audit database for writing.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }

    /// Opens an audit database read-only, for verification.
    pub fn open_read_only(path: &Path) -> rusqlite::Result<Self> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self { conn })
    }

    /// The last entry, if any.
    pub fn last(&self) -> rusqlite::Result<Option<StoredEntry>> {
        self.conn
            .query_row("SELECT seq, entry, hash, signature FROM entries ORDER BY seq DESC LIMIT 1", [], row_to_entry)
            .optional()
    }

    pub fn first(&self) -> rusqlite::Result<Option<StoredEntry>> {
        self.conn
            .query_row("SELECT seq, entry, hash, signature FROM entries ORDER BY seq ASC LIMIT 1", [], row_to_entry)
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
        let tx = self.conn.transaction()?;
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
            "SELECT seq, entry, hash, signature FROM entries WHERE seq = ?1",
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
        let mut stmt = self.conn.prepare("SELECT note FROM checkpoints ORDER BY size")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    }

    /// Calls `f` for every entry in seq order, stopping at its first error.
    pub fn for_each<E>(&self, mut f: impl FnMut(StoredEntry) -> Result<(), E>) -> Result<rusqlite::Result<()>, E> {
        let mut stmt = match self.conn.prepare("SELECT seq, entry, hash, signature FROM entries ORDER BY seq ASC") {
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
mod tests {
    use super::*;

    #[test]
    fn rows_cannot_be_updated_or_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = AuditStore::open(&dir.path().join("a.db")).unwrap();
        s.append(&[NewEntry { seq: 0, hash: [1; 32], entry: b"e".to_vec(), signature: [2; 64] }], &[(0, 0, [1; 32])])
            .unwrap();
        let upd = s.conn.execute("UPDATE entries SET entry = x'00'", []).unwrap_err().to_string();
        assert!(upd.contains("append-only"), "{upd}");
        let del = s.conn.execute("DELETE FROM entries", []).unwrap_err().to_string();
        assert!(del.contains("append-only"), "{del}");
        assert_eq!(s.count().unwrap(), 1);
        // A duplicate seq is refused and leaves nothing half-written.
        let dup = [
            NewEntry { seq: 1, hash: [1; 32], entry: b"f".to_vec(), signature: [2; 64] },
            NewEntry { seq: 0, hash: [1; 32], entry: b"g".to_vec(), signature: [2; 64] },
        ];
        assert!(s.append(&dup, &[]).is_err());
        let node = s.conn.execute("UPDATE tree_nodes SET hash = x'00'", []).unwrap_err().to_string();
        assert!(node.contains("append-only"), "{node}");
        s.add_checkpoint(1, 0, "note").unwrap();
        assert!(s.conn.execute("DELETE FROM checkpoints", []).is_err());
        assert_eq!(s.count().unwrap(), 1);
    }
}
