//! The credential inventory: a table derived from the log's grant and
//! revocation entries, written in the same transaction as the entries, so it
//! never disagrees with them. It is not part of the log (the verifier
//! ignores it), so rows change and expired ones are pruned.

use grantline_proto::audit::Event;
use rusqlite::{params, Connection};

/// The credential inventory: a view derived from the log's grant and
/// revocation entries, written in the same transaction as the entries, so it
/// never disagrees with them. It is not part of the log (the verifier ignores
/// it), so rows change and expired ones are pruned.
pub(crate) const SCHEMA: &str = r#"
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

/// Grants in the inventory, soonest expiry first.
pub(crate) fn grants(conn: &Connection, f: &GrantFilter, now: i64) -> rusqlite::Result<Vec<GrantRow>> {
    let mut stmt = conn.prepare_cached(
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
pub(crate) fn prune(conn: &Connection, now: i64) -> rusqlite::Result<usize> {
    conn.execute("DELETE FROM grants WHERE not_after < ?1", [now - INVENTORY_KEEP_EXPIRED_SECS])
}

pub(crate) fn apply(tx: &rusqlite::Transaction<'_>, ops: &[InventoryOp]) -> rusqlite::Result<()> {
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
