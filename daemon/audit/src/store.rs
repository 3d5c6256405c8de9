//! SQLite storage for the audit log: entries, the Merkle tree's complete
//! subtree hashes, and signed checkpoints. WAL, `synchronous=FULL`, and
//! triggers that refuse UPDATE and DELETE, so every table can only grow.

use std::path::Path;

use grantline_proto::audit::merkle::HashSource;
use grantline_proto::audit::{Entry, Event, Hash, StoredEntry};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

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

/// What a database handed to the verifier may hold besides its tables:
/// our own triggers and indexes (which never run on a read-only
/// connection). A view, a virtual table or another trigger is refused.
/// The most schema objects a database handed to the verifier may hold.
const MAX_SCHEMA_OBJECTS: i64 = 64;

const KNOWN_TRIGGERS: &[&str] = &[
    "entries_no_update",
    "entries_no_delete",
    "tree_nodes_no_update",
    "tree_nodes_no_delete",
    "checkpoints_no_update",
    "checkpoints_no_delete",
];

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

/// The credential inventory: a view derived from the log's grant and
/// revocation entries, written in the same transaction as the entries, so it
/// never disagrees with them. It is not part of the log (the verifier ignores
/// it), so rows change and expired ones are pruned.
const INVENTORY_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS grants (
    seq         INTEGER PRIMARY KEY,
    node        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    role        TEXT NOT NULL,
    serial      TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    names       TEXT NOT NULL,
    granted_ms  INTEGER NOT NULL,
    not_after   INTEGER NOT NULL,
    revoked_ms  INTEGER,
    caller_uid  INTEGER,
    caller_exe  TEXT NOT NULL DEFAULT '',
    caller_unit TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX IF NOT EXISTS grants_by_fingerprint ON grants (fingerprint);
CREATE INDEX IF NOT EXISTS grants_by_expiry ON grants (not_after);
"#;

/// How long expired grants stay listed (`grants list --all`).
pub const INVENTORY_KEEP_EXPIRED_SECS: i64 = 24 * 3600;

/// One row of the credential inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRow {
    pub seq: u64,
    pub node: String,
    pub kind: String,
    pub role: String,
    pub serial: String,
    pub fingerprint: String,
    pub names: Vec<String>,
    pub granted_ms: i64,
    pub not_after: i64,
    pub revoked_ms: Option<i64>,
    pub caller: Option<grantline_proto::audit::event::CallerInfo>,
}

/// What an entry changes in the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InventoryOp {
    Add(Box<GrantRow>),
    /// A lease was revoked: the grant with this fingerprint is no longer live.
    Revoke {
        fingerprint: String,
        at_ms: i64,
    },
}

impl InventoryOp {
    /// The inventory change an event makes, if any.
    pub fn of(seq: u64, time_ms: i64, event: &Event) -> Option<Self> {
        match event {
            Event::Grant { node, kind, role, serial, fingerprint, names, not_after, caller, .. } => {
                Some(Self::Add(Box::new(GrantRow {
                    seq,
                    node: node.clone(),
                    kind: kind.clone(),
                    role: role.clone(),
                    serial: serial.clone(),
                    fingerprint: fingerprint.clone(),
                    names: names.clone(),
                    granted_ms: time_ms,
                    not_after: *not_after,
                    revoked_ms: None,
                    caller: caller.clone(),
                })))
            }
            Event::LeaseRevocation { lease, .. } => Some(Self::Revoke { fingerprint: lease.clone(), at_ms: time_ms }),
            _ => None,
        }
    }
}

/// Which grants `AuditStore::grants` lists.
#[derive(Debug, Clone, Default)]
pub struct GrantFilter {
    pub node: Option<String>,
    pub kind: Option<String>,
    /// Include expired and revoked grants (as far as they are kept).
    pub all: bool,
    pub limit: usize,
}

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
        conn.execute_batch(INVENTORY_SCHEMA)?;
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
        apply_inventory(&tx, &ops)?;
        tx.pragma_update(None, "user_version", 1)?;
        tx.commit()
    }

    /// Opens an audit database read-only, for verification.
    pub fn open_read_only(path: &Path) -> rusqlite::Result<Self> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self { conn })
    }

    /// Opens a database that may have been made by an attacker (the
    /// verifier's input): read-only, no SQL functions from its schema, and
    /// only if `entries` and `checkpoints` are plain tables and the schema
    /// holds nothing that could run code or loop on a read.
    pub fn open_untrusted(path: &Path) -> anyhow::Result<Self> {
        use anyhow::{bail, Context};
        let store = Self::open_read_only(path)?;
        store.conn.pragma_update(None, "trusted_schema", false)?;
        store.conn.pragma_update(None, "query_only", true)?;
        store.conn.pragma_update(None, "cell_size_check", true)?;
        let objects: i64 = store
            .conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .context("cannot read the database schema")?;
        if objects > MAX_SCHEMA_OBJECTS {
            bail!(
                "{} holds {objects} schema objects; an audit database holds about 20, so this one was crafted",
                path.display()
            );
        }
        let mut stmt = store
            .conn
            .prepare("SELECT substr(type, 1, 16), substr(name, 1, 256), substr(tbl_name, 1, 256) FROM sqlite_schema")?;
        let rows =
            stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
        let mut tables = Vec::new();
        for row in rows {
            let (kind, name, table) = row?;
            match kind.as_str() {
                "table" => tables.push(name),
                "index" => {}
                "trigger" if KNOWN_TRIGGERS.contains(&name.as_str()) && name.starts_with(table.as_str()) => {}
                "trigger" => {
                    bail!("{} holds a trigger {name:?} on {table:?} that Grantline never makes", path.display())
                }
                "view" => bail!(
                    "{} holds a view {name:?}; an audit database holds only tables, so this one was crafted",
                    path.display()
                ),
                other => bail!("{} holds a schema object {name:?} of type {other:?}", path.display()),
            }
        }
        drop(stmt);
        if !tables.iter().any(|t| t == "entries") {
            bail!("{} has no entries table: it is not a Grantline audit database", path.display());
        }
        // SQLite's own account of each table: a virtual table (however its
        // CREATE was spelled) is refused, and so is any column of the tables
        // the verifier reads whose value SQLite would compute (generated
        // columns, defaults): a stored row is read as stored, or not at all.
        let mut list = store.conn.prepare("SELECT substr(name, 1, 256), substr(type, 1, 16) FROM pragma_table_list")?;
        let kinds: Vec<(String, String)> =
            list.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
        drop(list);
        for (name, kind) in &kinds {
            if kind != "table" {
                bail!("{} holds a {kind} table {name:?}; an audit database holds only plain tables", path.display());
            }
        }
        // The tables the verifier reads are Grantline's own shape: STRICT,
        // keyed by their integer sequence (the rowid), so every read is one
        // ordered pass over unique keys of one type. A table rebuilt without
        // its key would make paging quadratic and let rows repeat or hide.
        let strict: Vec<(String, bool)> = {
            let mut list = store.conn.prepare("SELECT substr(name, 1, 256), strict FROM pragma_table_list")?;
            let rows = list.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for (table, key) in [("entries", "seq"), ("checkpoints", "size")] {
            if !tables.iter().any(|t| t == table) {
                continue; // only a log from before checkpoints lacks one
            }
            let is_strict = strict.iter().any(|(name, s)| name == table && *s);
            let keys: Vec<(String, String)> = {
                let mut cols = store.conn.prepare(
                    "SELECT substr(name, 1, 64), substr(type, 1, 16) FROM pragma_table_xinfo(?1) WHERE pk > 0",
                )?;
                let rows = cols.query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            if !is_strict || keys != [(key.to_owned(), "INTEGER".to_owned())] {
                bail!(
                    "{}: table {table} is not Grantline's (a STRICT table keyed by {key} INTEGER PRIMARY KEY); \
                     this database was rebuilt or crafted",
                    path.display()
                );
            }
        }
        for table in ["entries", "checkpoints"] {
            let mut cols = store
                .conn
                .prepare("SELECT substr(name, 1, 64), hidden, dflt_value IS NOT NULL FROM pragma_table_xinfo(?1)")?;
            let computed: Vec<String> = cols
                .query_map([table], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, bool>(2)?)))?
                .filter_map(|c| c.ok().filter(|(_, hidden, default)| *hidden != 0 || *default).map(|(n, _, _)| n))
                .collect();
            if let Some(col) = computed.first() {
                bail!(
                    "{} computes column {table}.{col} (a generated column or a default); Grantline stores every \
                     value, so this database was crafted",
                    path.display()
                );
            }
        }
        Ok(store)
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
        apply_inventory(&tx, inventory)?;
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
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, node, kind, role, serial, fingerprint, names, granted_ms, not_after, revoked_ms,
                    caller_uid, caller_exe, caller_unit
             FROM grants
             WHERE (?1 IS NULL OR node = ?1) AND (?2 IS NULL OR kind = ?2)
               AND (?3 OR (not_after > ?4 AND revoked_ms IS NULL))
             ORDER BY not_after, seq LIMIT ?5",
        )?;
        let rows =
            stmt.query_map(params![f.node, f.kind, f.all, now, i64::try_from(f.limit).unwrap_or(i64::MAX)], |r| {
                let names: String = r.get(6)?;
                let uid: Option<u32> = r.get(10)?;
                Ok(GrantRow {
                    seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    node: r.get(1)?,
                    kind: r.get(2)?,
                    role: r.get(3)?,
                    serial: r.get(4)?,
                    fingerprint: r.get(5)?,
                    names: serde_json::from_str(&names).unwrap_or_default(),
                    granted_ms: r.get(7)?,
                    not_after: r.get(8)?,
                    revoked_ms: r.get(9)?,
                    caller: uid.map(|uid| grantline_proto::audit::event::CallerInfo {
                        uid,
                        gid: 0,
                        pid: 0,
                        exe: r.get(11).unwrap_or_default(),
                        unit: r.get(12).unwrap_or_default(),
                    }),
                })
            })?;
        rows.collect()
    }

    /// Drops inventory rows that expired more than a day ago.
    pub fn prune_inventory(&self, now: i64) -> rusqlite::Result<usize> {
        self.conn.execute("DELETE FROM grants WHERE not_after < ?1", [now - INVENTORY_KEEP_EXPIRED_SECS])
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

fn apply_inventory(tx: &rusqlite::Transaction<'_>, ops: &[InventoryOp]) -> rusqlite::Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    let mut add = tx.prepare_cached(
        "INSERT OR REPLACE INTO grants (seq, node, kind, role, serial, fingerprint, names, granted_ms, not_after,
            caller_uid, caller_exe, caller_unit) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?;
    let mut revoke =
        tx.prepare_cached("UPDATE grants SET revoked_ms = ?2 WHERE fingerprint = ?1 AND revoked_ms IS NULL")?;
    for op in ops {
        match op {
            InventoryOp::Add(g) => {
                add.execute(params![
                    i64::try_from(g.seq).unwrap_or(i64::MAX),
                    g.node,
                    g.kind,
                    g.role,
                    g.serial,
                    g.fingerprint,
                    serde_json::to_string(&g.names).unwrap_or_default(),
                    g.granted_ms,
                    g.not_after,
                    g.caller.as_ref().map(|c| c.uid),
                    g.caller.as_ref().map(|c| c.exe.as_str()).unwrap_or(""),
                    g.caller.as_ref().map(|c| c.unit.as_str()).unwrap_or(""),
                ])?;
            }
            InventoryOp::Revoke { fingerprint, at_ms } => {
                revoke.execute(params![fingerprint, at_ms])?;
            }
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_serve_side_by_side() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let mut s = AuditStore::open(&path).unwrap();
        s.append(&[NewEntry { seq: 0, hash: [1; 32], entry: b"e".to_vec(), signature: [2; 64] }], &[(0, 0, [1; 32])])
            .unwrap();
        let readers = AuditReaders::open(&path, 2).unwrap();
        // A read while another is under way takes the other connection
        // (with one connection this would wait for itself).
        let counts = readers.with(|a| (a.count().unwrap(), readers.with(|b| b.count().unwrap())));
        assert_eq!(counts, (1, 1));
        assert!(AuditReaders::open(&dir.path().join("missing/a.db"), 2).is_err());
    }

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
