//! SQLite storage for audit entries: WAL, `synchronous=FULL`, and triggers that
//! refuse UPDATE and DELETE, so the table can only grow.

use std::path::Path;

use grantline_proto::audit::{Hash, StoredEntry};
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
"#;

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

    /// Appends a batch in one transaction: all or nothing, durable on return.
    pub fn append(&mut self, batch: &[NewEntry]) -> rusqlite::Result<()> {
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
        }
        tx.commit()
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
        s.append(&[NewEntry { seq: 0, hash: [1; 32], entry: b"e".to_vec(), signature: [2; 64] }]).unwrap();
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
        assert!(s.append(&dup).is_err());
        assert_eq!(s.count().unwrap(), 1);
    }
}
