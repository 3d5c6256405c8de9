//! Opening an audit database that may have been made by an attacker (the
//! verifier's input): read-only, and only if its schema holds nothing but
//! plain tables and our own triggers and indexes.

use std::path::Path;

use crate::store::AuditStore;

/// The most schema objects a database handed to the verifier may hold.
const MAX_SCHEMA_OBJECTS: i64 = 64;

/// What a database handed to the verifier may hold besides its tables:
/// our own triggers and indexes (which never run on a read-only
/// connection). A view, a virtual table or another trigger is refused.
const KNOWN_TRIGGERS: &[&str] = &[
    "entries_no_update",
    "entries_no_delete",
    "tree_nodes_no_update",
    "tree_nodes_no_delete",
    "checkpoints_no_update",
    "checkpoints_no_delete",
];

impl AuditStore {
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
}
