//! The state store of a fleet of brokers: PostgreSQL, shared (RFD 0010).
//! Join tokens, nodes, leases, the brokers themselves and where each node
//! is connected live here; each broker keeps the node records in memory
//! (its registry) and is told of every change by [`feed`], so no agent's
//! request reads the database.

mod connect;
mod feed;
mod rows;
mod schema;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

pub use connect::{redacted, PgConfig, StateFile, DEFAULT_MAX_STALENESS, DEFAULT_POOL_SIZE, MAX_POOL_SIZE};
pub use feed::Change;
use grantline_proto::clock::now_unix_ms as now_ms;
pub use rows::FleetBroker;
use rows::{lease_from_row, node_from_row, NODE_COLUMNS};

use super::store::{
    Accept, LeaseRecord, NewToken, NodeRecord, Redeemed, Replace, StateStore, StoreFuture, TokenError, TokenFuture,
    Upsert,
};
use super::token;
use grantline_proto::clock::now_unix;

/// A broker counts as alive while its heartbeat is younger than this.
pub const BROKER_ALIVE_MS: i64 = 15_000;

/// This broker as it registers itself with the fleet.
#[derive(Debug, Clone)]
pub struct ThisBroker {
    /// Its audit log's origin: unique in the fleet.
    pub id: String,
    /// PEM of the CA that signs its node identities (the others trust it).
    pub node_ca: String,
    /// The fleet key's signature over it, base64 (`node-ca.endorsement`).
    pub node_ca_endorsement: String,
    /// Its audit verifier key (`origin+hash+key`).
    pub audit_key: String,
}

/// The PostgreSQL store; clones share the pool.
#[derive(Clone)]
pub struct PgStore {
    pool: deadpool_postgres::Pool,
    target: connect::Target,
    me: Arc<ThisBroker>,
    /// When the change feed last proved itself current (`feed::mono_ms`).
    current_at: Arc<AtomicI64>,
    max_staleness: Duration,
}

impl PgStore {
    /// Connects, migrates the schema and registers this broker. Refuses to
    /// start as a broker whose id another live broker holds with another key.
    pub async fn open(cfg: &PgConfig, me: ThisBroker) -> Result<Self> {
        let target = cfg.target()?;
        let (mut client, _driver) = target.connect().await?;
        schema::migrate(&mut client).await.with_context(|| format!("cannot migrate the schema at {}", target.name))?;
        let now = now_ms();
        let holder = client
            .query_opt("SELECT audit_key, heartbeat_ms FROM brokers WHERE id = $1", &[&me.id])
            .await?
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)));
        if let Some((key, beat)) = holder {
            anyhow::ensure!(
                key == me.audit_key || now - beat > BROKER_ALIVE_MS,
                "another broker with origin {:?} and another audit key is alive in this fleet (heartbeat {} ms ago); \
                 give each broker its own origin",
                me.id,
                now - beat
            );
        }
        client
            .execute(
                "INSERT INTO brokers (id, node_ca, node_ca_endorsement, audit_key, started_at, heartbeat_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (id) DO UPDATE SET node_ca = excluded.node_ca, node_ca_endorsement = excluded.node_ca_endorsement,
                    audit_key = excluded.audit_key, started_at = excluded.started_at, heartbeat_ms = excluded.heartbeat_ms",
                &[&me.id, &me.node_ca, &me.node_ca_endorsement, &me.audit_key, &now_unix(), &now],
            )
            .await?;
        // Connections this broker held before it stopped are gone.
        client.execute("DELETE FROM presence WHERE broker = $1", &[&me.id]).await?;
        let pool = target.pool(cfg.pool_size)?;
        tracing::info!(database = %target.name, pool = cfg.pool_size, "state in PostgreSQL (fleet mode)");
        Ok(Self {
            pool,
            target,
            me: Arc::new(me),
            current_at: Arc::new(AtomicI64::new(feed::mono_ms())),
            max_staleness: cfg.max_staleness,
        })
    }

    pub fn broker_id(&self) -> &str {
        &self.me.id
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        let started = std::time::Instant::now();
        let client = self.pool.get().await.map_err(|e| {
            metrics::counter!("grantline_state_errors_total").increment(1);
            anyhow::anyhow!("PostgreSQL at {} is unreachable: {e}", self.target.name)
        })?;
        metrics::histogram!("grantline_state_pool_wait_seconds").record(started.elapsed().as_secs_f64());
        Ok(client)
    }

    /// Runs one store operation, counting its latency and errors.
    fn timed<'a, T: Send + 'a>(
        &'a self,
        op: &'static str,
        work: impl std::future::Future<Output = Result<T>> + Send + 'a,
    ) -> StoreFuture<'a, T> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let out = work.await;
            metrics::histogram!("grantline_state_seconds", "op" => op).record(started.elapsed().as_secs_f64());
            if out.is_err() {
                metrics::counter!("grantline_state_errors_total", "op" => op).increment(1);
            }
            out
        })
    }

    /// Every node record, for a broker's registry at start.
    pub async fn all_nodes(&self) -> Result<Vec<NodeRecord>> {
        let rows = self.client().await?.query(&format!("SELECT {NODE_COLUMNS} FROM nodes"), &[]).await?;
        rows.iter().map(node_from_row).collect()
    }

    /// The brokers of the fleet, alive or not.
    pub async fn brokers(&self) -> Result<Vec<FleetBroker>> {
        rows::brokers(&**self.client().await?).await
    }

    /// Starts the change feed (RFD 0010); it runs until the receiver is dropped.
    pub fn watch(&self) -> tokio::sync::mpsc::Receiver<Change> {
        feed::Feed { target: self.target.clone(), broker: self.me.id.clone(), current_at: self.current_at.clone() }
            .watch()
    }
}

/// The fleet's table of brokers, for `grantlined fleet brokers` and
/// `retire` (no broker is registered by it).
pub struct FleetAdmin {
    client: tokio_postgres::Client,
    _driver: connect::Driver,
}

impl FleetAdmin {
    pub async fn connect(cfg: &PgConfig) -> Result<Self> {
        let (mut client, driver) = cfg.target()?.connect().await?;
        schema::migrate(&mut client).await?;
        Ok(Self { client, _driver: driver })
    }

    pub async fn brokers(&self) -> Result<Vec<FleetBroker>> {
        rows::brokers(&self.client).await
    }

    /// Takes a broker out of the fleet: its node CA is no longer trusted
    /// and its presence rows go. False if no such broker was registered.
    pub async fn retire(&mut self, id: &str) -> Result<bool> {
        let tx = self.client.transaction().await?;
        tx.execute("DELETE FROM presence WHERE broker = $1", &[&id]).await?;
        let n = tx.execute("DELETE FROM brokers WHERE id = $1", &[&id]).await?;
        tx.commit().await?;
        Ok(n == 1)
    }
}

impl StateStore for PgStore {
    fn create_token<'a>(
        &'a self,
        node: Option<&'a str>,
        labels: &'a BTreeMap<String, String>,
        ttl: Duration,
        now: i64,
    ) -> StoreFuture<'a, NewToken> {
        self.timed("create_token", async move {
            let t = token::mint(ttl, now);
            let labels = serde_json::to_value(labels)?;
            self.client()
                .await?
                .execute(
                    "INSERT INTO join_tokens (id, secret_hash, node, labels, created_at, created_by, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[&t.id, &&t.secret_hash[..], &node, &labels, &now, &self.me.id, &t.expires_at],
                )
                .await?;
            Ok(NewToken { token: t.token, id: t.id, expires_at: t.expires_at })
        })
    }

    fn delete_token<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()> {
        self.timed("delete_token", async move {
            self.client().await?.execute("DELETE FROM join_tokens WHERE id = $1 AND used_at IS NULL", &[&id]).await?;
            Ok(())
        })
    }

    fn redeem_token<'a>(&'a self, token: &'a str, used_by: &'a str, now: i64, accept: Accept<'a>) -> TokenFuture<'a> {
        Box::pin(async move {
            let (id, secret) = token::parse(token)?;
            let store = |e: &dyn std::fmt::Display| TokenError::Store(e.to_string());
            let mut client = self.client().await.map_err(|e| store(&e))?;
            // The row lock makes the token single-use across the fleet: a
            // second redemption at another broker waits here, then sees it used.
            let tx = client.transaction().await.map_err(|e| store(&e))?;
            let row = tx
                .query_opt(
                    "SELECT secret_hash, node, labels, expires_at, used_at FROM join_tokens WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await
                .map_err(|e| store(&e))?;
            let Some(row) = row else { return Err(TokenError::Unknown(id.into())) };
            let stored = token::Stored {
                secret_hash: row.get(0),
                used: row.get::<_, Option<i64>>(4).is_some(),
                expires_at: row.get(3),
            };
            token::check(id, secret, Some(stored), now)?;
            let labels: serde_json::Value = row.get(2);
            let labels = serde_json::from_value(labels).map_err(|e| store(&e))?;
            let redeemed = Redeemed { id: id.into(), node: row.get(1), labels };
            accept(&redeemed)?;
            tx.execute("UPDATE join_tokens SET used_at = $1, used_by = $2 WHERE id = $3", &[&now, &used_by, &id])
                .await
                .map_err(|e| store(&e))?;
            tx.commit().await.map_err(|e| store(&e))?;
            Ok(redeemed)
        })
    }

    fn upsert_node<'a>(&'a self, n: &'a NodeRecord, replace: Replace<'a>, now: i64) -> StoreFuture<'a, Upsert> {
        self.timed("upsert_node", async move {
            let labels = serde_json::to_value(&n.labels)?;
            let (mode, from) = replace.sql();
            let client = self.client().await?;
            // The row lock of the conflict makes the check and the write
            // one step across the fleet: a renewal from an identity that a
            // renewal elsewhere replaced, and was used, finds no row.
            let row = client
                .query_opt(
                    "INSERT INTO nodes (name, labels, serial, previous_serial, not_after, enrolled_at, last_seen, current_seen)
                     VALUES ($1, $2, $3, $4, $5, $6, $6, false)
                     ON CONFLICT (name) DO UPDATE SET labels = excluded.labels, serial = excluded.serial,
                        previous_serial = excluded.previous_serial, not_after = excluded.not_after, current_seen = false
                     WHERE nodes.revoked_at IS NULL
                        AND ($7 = 'any' OR ($7 = 'from'
                             AND (nodes.serial = $8 OR (nodes.previous_serial = $8 AND NOT nodes.current_seen))))
                     RETURNING version",
                    &[&n.name, &labels, &n.serial, &n.previous_serial, &n.not_after, &now, &mode, &from],
                )
                .await?;
            if let Some(row) = row {
                return Ok(Upsert::Stored(row.get(0)));
            }
            let revoked = client.query_opt("SELECT revoked_at FROM nodes WHERE name = $1", &[&n.name]).await?;
            Ok(match revoked.and_then(|r| r.get::<_, Option<i64>>(0)) {
                Some(_) => Upsert::Revoked,
                None => Upsert::Conflict,
            })
        })
    }

    fn mark_current_seen<'a>(&'a self, name: &'a str, serial: &'a str) -> StoreFuture<'a, bool> {
        self.timed("mark_current_seen", async move {
            let row = self
                .client()
                .await?
                .query_opt(
                    "UPDATE nodes SET current_seen = true WHERE name = $1 AND serial = $2 AND revoked_at IS NULL
                     RETURNING 1",
                    &[&name, &serial],
                )
                .await?;
            Ok(row.is_some())
        })
    }

    fn revoke_node<'a>(&'a self, name: &'a str, now: i64) -> StoreFuture<'a, bool> {
        self.timed("revoke_node", async move {
            let n = self
                .client()
                .await?
                .execute("UPDATE nodes SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL", &[&now, &name])
                .await?;
            Ok(n == 1)
        })
    }

    fn save_last_seen(&self, seen: Vec<(String, i64)>) -> StoreFuture<'static, ()> {
        let store = self.clone();
        Box::pin(async move {
            let (names, at): (Vec<String>, Vec<i64>) = seen.into_iter().unzip();
            store
                .client()
                .await?
                .execute(
                    "UPDATE nodes n SET last_seen = GREATEST(coalesce(n.last_seen, 0), s.at)
                     FROM unnest($1::text[], $2::bigint[]) AS s(name, at) WHERE n.name = s.name",
                    &[&names, &at],
                )
                .await?;
            Ok(())
        })
    }

    fn nodes(&self) -> StoreFuture<'static, Vec<NodeRecord>> {
        let store = self.clone();
        Box::pin(async move { store.all_nodes().await })
    }

    fn record_lease<'a>(&'a self, l: &'a LeaseRecord) -> StoreFuture<'a, ()> {
        self.timed("record_lease", async move {
            self.client()
                .await?
                .execute(
                    "INSERT INTO leases (lease_id, node, fingerprint, expires_at, granted_by) VALUES ($1, $2, $3, $4, $5)",
                    &[&l.lease_id, &l.node, &l.fingerprint, &l.expires_at, &self.me.id],
                )
                .await?;
            Ok(())
        })
    }

    fn lease<'a>(&'a self, lease_id: &'a str) -> StoreFuture<'a, Option<LeaseRecord>> {
        self.timed("lease", async move {
            let row = self
                .client()
                .await?
                .query_opt(
                    "SELECT lease_id, node, fingerprint, expires_at FROM leases WHERE lease_id = $1 AND revoked_at IS NULL",
                    &[&lease_id],
                )
                .await?;
            row.as_ref().map(lease_from_row).transpose()
        })
    }

    fn live_leases<'a>(&'a self, node: &'a str, now: i64) -> StoreFuture<'a, Vec<LeaseRecord>> {
        self.timed("live_leases", async move {
            let rows = self
                .client()
                .await?
                .query(
                    "SELECT lease_id, node, fingerprint, expires_at FROM leases
                     WHERE node = $1 AND revoked_at IS NULL AND expires_at > $2",
                    &[&node, &now],
                )
                .await?;
            rows.iter().map(lease_from_row).collect()
        })
    }

    fn mark_lease_revoked<'a>(&'a self, lease_id: &'a str, now: i64) -> StoreFuture<'a, ()> {
        self.timed("mark_lease_revoked", async move {
            self.client()
                .await?
                .execute(
                    "UPDATE leases SET revoked_at = $1 WHERE lease_id = $2 AND revoked_at IS NULL",
                    &[&now, &lease_id],
                )
                .await?;
            Ok(())
        })
    }

    fn fresh(&self) -> Result<(), String> {
        let silent = feed::mono_ms().saturating_sub(self.current_at.load(Ordering::Relaxed));
        let bound = i64::try_from(self.max_staleness.as_millis()).unwrap_or(i64::MAX);
        if silent <= bound {
            return Ok(());
        }
        Err(format!(
            "this broker has not heard from the fleet's database for {} s (bound {} s), so a revocation made at \
             another broker could be missed; grants resume once PostgreSQL is reachable, retry or use another broker",
            silent / 1000,
            bound / 1000
        ))
    }

    fn save_presence(&self, here: Vec<String>, gone: Vec<String>) -> StoreFuture<'static, ()> {
        let store = self.clone();
        Box::pin(async move {
            let mut client = store.client().await?;
            let tx = client.transaction().await?;
            if !gone.is_empty() {
                tx.execute("DELETE FROM presence WHERE broker = $1 AND node = ANY($2)", &[&store.me.id, &gone]).await?;
            }
            if !here.is_empty() {
                tx.execute(
                    "INSERT INTO presence (node, broker, since) SELECT n, $1, $2 FROM unnest($3::text[]) AS n
                     ON CONFLICT DO NOTHING",
                    &[&store.me.id, &now_unix(), &here],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn presence(&self) -> StoreFuture<'static, Vec<(String, String)>> {
        let store = self.clone();
        Box::pin(async move {
            let rows = store
                .client()
                .await?
                .query(
                    "SELECT p.node, p.broker FROM presence p JOIN brokers b ON b.id = p.broker
                     WHERE b.heartbeat_ms > $1 ORDER BY p.node, p.broker",
                    &[&(now_ms() - BROKER_ALIVE_MS)],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }
}
