//! The state store of one broker: SQLite in `state.db` (WAL, synchronous
//! writes), with its schema and migrations. Batches of writes run off the
//! async workers.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};

use super::store::{
    Accept, LeaseRecord, NewToken, NodeRecord, Redeemed, Replace, StateStore, StoreFuture, TokenError, TokenFuture,
    Upsert,
};
use super::token;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS join_tokens (
    id          TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    node        TEXT,
    labels      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    used_by     TEXT
) STRICT;
CREATE TABLE IF NOT EXISTS nodes (
    name        TEXT PRIMARY KEY,
    labels      TEXT NOT NULL,
    serial      TEXT NOT NULL,
    not_after   INTEGER NOT NULL,
    enrolled_at INTEGER NOT NULL,
    revoked_at  INTEGER
) STRICT;
CREATE TABLE IF NOT EXISTS leases (
    lease_id    TEXT PRIMARY KEY,
    node        TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    revoked_at  INTEGER
) STRICT;
CREATE INDEX IF NOT EXISTS leases_by_node ON leases (node) WHERE revoked_at IS NULL;
"#;

/// Columns added after the first release, each applied once.
const MIGRATIONS: &[&str] = &[
    "ALTER TABLE nodes ADD COLUMN last_seen INTEGER",
    // The identity a renewal replaced, accepted until the agent reconnects
    // with the new one; cleared by a re-enrollment.
    "ALTER TABLE nodes ADD COLUMN previous_serial TEXT NOT NULL DEFAULT ''",
];

/// `state.db`. A clone shares the connection.
#[derive(Clone)]
pub struct StateDb {
    conn: Arc<Mutex<Connection>>,
}

impl StateDb {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).with_context(|| format!("cannot open state database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        for (step, m) in (1i64..).zip(MIGRATIONS).skip(usize::try_from(version).unwrap_or(0)) {
            conn.execute_batch(m).with_context(|| format!("cannot upgrade {} (step {step})", path.display()))?;
            conn.pragma_update(None, "user_version", step)?;
        }
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn create_token(
        &self,
        node: Option<&str>,
        labels: &BTreeMap<String, String>,
        ttl: Duration,
        now: i64,
    ) -> Result<NewToken> {
        let t = token::mint(ttl, now);
        self.conn().execute(
            "INSERT INTO join_tokens (id, secret_hash, node, labels, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![t.id, &t.secret_hash[..], node, serde_json::to_string(labels)?, now, t.expires_at],
        )?;
        Ok(NewToken { token: t.token, id: t.id, expires_at: t.expires_at })
    }

    /// Removes a token that was never handed out (its creation could not be audited).
    pub fn delete_token(&self, id: &str) -> Result<()> {
        self.conn().execute("DELETE FROM join_tokens WHERE id = ?1 AND used_at IS NULL", [id])?;
        Ok(())
    }

    /// Marks a node revoked; false if it is unknown or already revoked.
    pub fn revoke_node(&self, name: &str, now: i64) -> Result<bool> {
        let n = self
            .conn()
            .execute("UPDATE nodes SET revoked_at = ?1 WHERE name = ?2 AND revoked_at IS NULL", params![now, name])?;
        Ok(n == 1)
    }

    /// Records when nodes were last heard from, in one transaction.
    pub fn save_last_seen(&self, seen: &[(String, i64)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt =
                tx.prepare_cached("UPDATE nodes SET last_seen = max(coalesce(last_seen, 0), ?2) WHERE name = ?1")?;
            for (name, at) in seen {
                stmt.execute(params![name, at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Redeems a join token once: the first caller wins, every later one
    /// gets `Used`. `accept` sees what the token grants before
    /// it is spent and may refuse ([`TokenError::Refused`]): the token then
    /// stays unused.
    pub fn redeem_token(
        &self,
        token: &str,
        used_by: &str,
        now: i64,
        accept: impl FnOnce(&Redeemed) -> Result<(), TokenError>,
    ) -> Result<Redeemed, TokenError> {
        let (id, secret) = token::parse(token)?;
        let store = |e: rusqlite::Error| TokenError::Store(e.to_string());
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT secret_hash, node, labels, expires_at, used_at FROM join_tokens WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(store)?;
        let (node, labels) = match row {
            Some((secret_hash, node, labels, expires_at, used_at)) => {
                token::check(
                    id,
                    secret,
                    Some(token::Stored { secret_hash, used: used_at.is_some(), expires_at }),
                    now,
                )?;
                (node, labels)
            }
            None => return Err(TokenError::Unknown(id.into())),
        };
        let labels = serde_json::from_str(&labels).map_err(|e| TokenError::Store(e.to_string()))?;
        let redeemed = Redeemed { id: id.into(), node, labels };
        accept(&redeemed)?;
        let changed = conn
            .execute(
                "UPDATE join_tokens SET used_at = ?1, used_by = ?2 WHERE id = ?3 AND used_at IS NULL",
                params![now, used_by, id],
            )
            .map_err(store)?;
        if changed != 1 {
            return Err(TokenError::Used(id.into()));
        }
        Ok(redeemed)
    }

    /// Records a node's identity as `replace` allows; a revoked node is
    /// never written.
    pub fn upsert_node(&self, n: &NodeRecord, replace: Replace<'_>, now: i64) -> Result<Upsert> {
        let (mode, from) = replace.sql();
        let conn = self.conn();
        let changed = conn.execute(
            "INSERT INTO nodes (name, labels, serial, previous_serial, not_after, enrolled_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(name) DO UPDATE SET labels = excluded.labels, serial = excluded.serial,
                previous_serial = excluded.previous_serial, not_after = excluded.not_after
             WHERE nodes.revoked_at IS NULL
                AND (?7 = 'any' OR (?7 = 'from' AND (nodes.serial = ?8 OR nodes.previous_serial = ?8)))",
            params![n.name, serde_json::to_string(&n.labels)?, n.serial, n.previous_serial, n.not_after, now, mode, from],
        )?;
        if changed == 1 {
            return Ok(Upsert::Stored(0));
        }
        let revoked: Option<Option<i64>> =
            conn.query_row("SELECT revoked_at FROM nodes WHERE name = ?1", [&n.name], |r| r.get(0)).optional()?;
        Ok(if matches!(revoked, Some(Some(_))) { Upsert::Revoked } else { Upsert::Conflict })
    }

    /// Records many nodes in one transaction (fixture provisioning).
    pub fn upsert_nodes(&self, nodes: &[NodeRecord], now: i64) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO nodes (name, labels, serial, not_after, enrolled_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(name) DO UPDATE SET labels = excluded.labels, serial = excluded.serial, not_after = excluded.not_after",
            )?;
            for n in nodes {
                stmt.execute(params![n.name, serde_json::to_string(&n.labels)?, n.serial, n.not_after, now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn record_lease(&self, l: &LeaseRecord) -> Result<()> {
        self.conn().execute(
            "INSERT INTO leases (lease_id, node, fingerprint, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![l.lease_id, l.node, l.fingerprint, l.expires_at],
        )?;
        Ok(())
    }

    /// A lease that has not been revoked.
    pub fn lease(&self, lease_id: &str) -> Result<Option<LeaseRecord>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT lease_id, node, fingerprint, expires_at FROM leases WHERE lease_id = ?1 AND revoked_at IS NULL",
                [lease_id],
                |r| {
                    Ok(LeaseRecord {
                        lease_id: r.get(0)?,
                        node: r.get(1)?,
                        fingerprint: r.get(2)?,
                        expires_at: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// The leases of a node that are neither revoked nor expired.
    pub fn live_leases(&self, node: &str, now: i64) -> Result<Vec<LeaseRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT lease_id, node, fingerprint, expires_at FROM leases WHERE node = ?1 AND revoked_at IS NULL AND expires_at > ?2",
        )?;
        let rows = stmt.query_map(params![node, now], |r| {
            Ok(LeaseRecord { lease_id: r.get(0)?, node: r.get(1)?, fingerprint: r.get(2)?, expires_at: r.get(3)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn mark_lease_revoked(&self, lease_id: &str, now: i64) -> Result<()> {
        self.conn().execute("UPDATE leases SET revoked_at = ?1 WHERE lease_id = ?2", params![now, lease_id])?;
        Ok(())
    }

    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT name, labels, serial, not_after, revoked_at, last_seen, previous_serial FROM nodes")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, String>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, labels, serial, not_after, revoked_at, last_seen, previous_serial) = row?;
            out.push(NodeRecord {
                name,
                labels: serde_json::from_str(&labels)?,
                serial,
                previous_serial,
                current_seen: true,
                not_after,
                revoked: revoked_at.is_some(),
                revoked_at: revoked_at.unwrap_or(0),
                last_seen: last_seen.unwrap_or(0),
                version: 0,
            });
        }
        Ok(out)
    }
}

impl StateDb {
    /// Runs `work` off the async workers (a batch can take a while on a
    /// large fleet).
    fn off_workers<T: Send + 'static>(
        &self,
        work: impl FnOnce(&StateDb) -> Result<T> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        let db = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || work(&db))
                .await
                .map_err(|e| anyhow::anyhow!("state store task: {e}"))?
        })
    }
}

impl StateStore for StateDb {
    fn create_token<'a>(
        &'a self,
        node: Option<&'a str>,
        labels: &'a BTreeMap<String, String>,
        ttl: Duration,
        now: i64,
    ) -> StoreFuture<'a, NewToken> {
        Box::pin(std::future::ready(StateDb::create_token(self, node, labels, ttl, now)))
    }

    fn delete_token<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(StateDb::delete_token(self, id)))
    }

    fn redeem_token<'a>(&'a self, token: &'a str, used_by: &'a str, now: i64, accept: Accept<'a>) -> TokenFuture<'a> {
        Box::pin(std::future::ready(StateDb::redeem_token(self, token, used_by, now, accept)))
    }

    fn upsert_node<'a>(&'a self, node: &'a NodeRecord, replace: Replace<'a>, now: i64) -> StoreFuture<'a, Upsert> {
        Box::pin(std::future::ready(StateDb::upsert_node(self, node, replace, now)))
    }

    fn revoke_node<'a>(&'a self, name: &'a str, now: i64) -> StoreFuture<'a, bool> {
        Box::pin(std::future::ready(StateDb::revoke_node(self, name, now)))
    }

    fn save_last_seen(&self, seen: Vec<(String, i64)>) -> StoreFuture<'static, ()> {
        self.off_workers(move |db| db.save_last_seen(&seen))
    }

    fn nodes(&self) -> StoreFuture<'static, Vec<NodeRecord>> {
        self.off_workers(|db| db.nodes())
    }

    fn record_lease<'a>(&'a self, lease: &'a LeaseRecord) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(StateDb::record_lease(self, lease)))
    }

    fn lease<'a>(&'a self, lease_id: &'a str) -> StoreFuture<'a, Option<LeaseRecord>> {
        Box::pin(std::future::ready(StateDb::lease(self, lease_id)))
    }

    fn live_leases<'a>(&'a self, node: &'a str, now: i64) -> StoreFuture<'a, Vec<LeaseRecord>> {
        Box::pin(std::future::ready(StateDb::live_leases(self, node, now)))
    }

    fn mark_lease_revoked<'a>(&'a self, lease_id: &'a str, now: i64) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(StateDb::mark_lease_revoked(self, lease_id, now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_use_hashed_and_expiring() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("s.db")).unwrap();
        let labels = BTreeMap::from([("env".to_owned(), "dev".to_owned())]);
        let t = db.create_token(Some("n1"), &labels, Duration::from_secs(60), 1000).unwrap();
        // Only the hash is stored.
        let secret = t.token.rsplit('.').next().unwrap().to_owned();
        let stored: Vec<u8> = db.conn().query_row("SELECT secret_hash FROM join_tokens", [], |r| r.get(0)).unwrap();
        assert_ne!(stored, secret.as_bytes());

        let wrong = format!("glt1.{}.{}", t.id, "A".repeat(43));
        assert_eq!(db.redeem_token(&wrong, "x", 1001, |_| Ok(())).unwrap_err(), TokenError::Unknown(t.id.clone()));
        let r = db.redeem_token(&t.token, "n1", 1001, |_| Ok(())).unwrap();
        assert_eq!((r.node.as_deref(), r.labels), (Some("n1"), labels));
        assert_eq!(db.redeem_token(&t.token, "n1", 1002, |_| Ok(())).unwrap_err(), TokenError::Used(t.id.clone()));

        let old = db.create_token(None, &BTreeMap::new(), Duration::from_secs(60), 1000).unwrap();
        assert!(matches!(db.redeem_token(&old.token, "x", 1060, |_| Ok(())), Err(TokenError::Expired { .. })));
        assert_eq!(db.redeem_token("nonsense", "x", 0, |_| Ok(())).unwrap_err(), TokenError::Malformed);
        assert_eq!(db.redeem_token("glt1.zz.y", "x", 0, |_| Ok(())).unwrap_err(), TokenError::Malformed);

        // A redemption its caller refuses leaves the token unused.
        let t = db.create_token(None, &BTreeMap::new(), Duration::from_secs(60), 1000).unwrap();
        let refused = db.redeem_token(&t.token, "x", 1001, |r| {
            assert_eq!(r.node, None);
            Err(TokenError::Refused("no".into()))
        });
        assert_eq!(refused.unwrap_err(), TokenError::Refused("no".into()));
        assert!(db.redeem_token(&t.token, "x", 1001, |_| Ok(())).is_ok());
    }

    #[test]
    fn leases_are_found_by_id_and_node_until_revoked_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("s.db")).unwrap();
        let l = LeaseRecord {
            lease_id: "database/creds/ro/abc".into(),
            node: "n1".into(),
            fingerprint: "f".into(),
            expires_at: 100,
        };
        db.record_lease(&l).unwrap();
        assert!(db.record_lease(&l).is_err(), "a lease id is recorded once");
        assert_eq!(db.lease(&l.lease_id).unwrap(), Some(l.clone()));
        assert_eq!(db.live_leases("n1", 50).unwrap(), vec![l.clone()]);
        assert!(db.live_leases("n1", 100).unwrap().is_empty());
        assert!(db.live_leases("n2", 50).unwrap().is_empty());
        db.mark_lease_revoked(&l.lease_id, 60).unwrap();
        assert_eq!(db.lease(&l.lease_id).unwrap(), None);
        assert!(db.live_leases("n1", 50).unwrap().is_empty());
    }
}
