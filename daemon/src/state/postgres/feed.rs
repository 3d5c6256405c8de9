//! The change feed: one connection per broker that LISTENs on the fleet's
//! channels, fetches the node records each notification names, heartbeats
//! the broker's row (which also proves the connection alive), and after
//! any break reconnects with backoff and full jitter and reloads every
//! node record, so no change made while it was away is missed. The feed
//! marks the store current after each heartbeat that succeeds; its
//! silence is what [`super::PgStore`]'s staleness bound measures.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::sync::mpsc;

use super::super::store::NodeRecord;
use super::connect::{Target, BEAT_PREFIX};
use super::rows::{brokers, node_from_row, FleetBroker, NODE_COLUMNS};
use grantline_proto::clock::now_unix_ms as now_ms;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

/// What the feed reports to the broker.
#[derive(Debug)]
pub enum Change {
    /// Records as they now stand, each with when it changed (ms since the
    /// epoch, the database's clock), for the metric of propagation delay.
    Nodes(Vec<(NodeRecord, i64)>),
    /// Every record, after the feed (re)connected.
    Resync(Vec<NodeRecord>),
    /// The brokers of the fleet, after one joined, changed or retired.
    Brokers(Vec<FleetBroker>),
}

/// How often the feed heartbeats (and so proves itself current).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A heartbeat that takes longer than this counts as a broken connection.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Node names fetched per query after a burst of notifications.
const FETCH_BATCH: usize = 1000;

/// What the feed needs of its store: where the database is, which broker
/// it heartbeats as, and where it notes that it is current.
pub(super) struct Feed {
    pub target: Target,
    pub broker: String,
    pub current_at: Arc<AtomicI64>,
}

impl Feed {
    /// Starts the feed; it runs until the receiver is dropped.
    pub fn watch(self) -> mpsc::Receiver<Change> {
        let (tx, rx) = mpsc::channel(1024);
        let store = self;
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match store.follow(&tx).await {
                    Ok(()) => return,
                    Err(e) => {
                        metrics::counter!("grantline_state_errors_total", "op" => "feed").increment(1);
                        tracing::warn!(error = %format!("{e:#}"), "the fleet's change feed broke; reconnecting");
                    }
                }
                // Full jitter: brokers cut off together do not return together.
                let wait = backoff.mul_f64(rand::random::<f64>());
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = tx.closed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
        rx
    }

    /// One connection's life: listen, catch up, then follow until it breaks
    /// (an error) or the broker stops listening (Ok).
    async fn follow(&self, tx: &mpsc::Sender<Change>) -> Result<()> {
        let (client, mut driver) = self.target.connect().await?;
        // A channel of this connection's own, named at random: no other
        // session can send a heartbeat on it (NOTIFY needs no privilege).
        let beat_channel = format!("{BEAT_PREFIX}{}", hex::encode(rand::random::<[u8; 8]>()));
        client
            .batch_execute(&format!("LISTEN grantline_nodes; LISTEN grantline_brokers; LISTEN {beat_channel}"))
            .await?;
        // Listening first, then reading everything: a change committed in
        // between is both read and notified, never neither.
        if !self.reload(&client, tx).await? {
            return Ok(());
        }
        let mut beat = tokio::time::interval(HEARTBEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The heartbeat in flight: its number and when the oldest unanswered
        // one was sent.
        let mut pending: Option<(u64, i64)> = None;
        let mut sent = 0u64;
        loop {
            tokio::select! {
                first = driver.notifications.recv() => {
                    let Some(first) = first else { bail!("the connection to PostgreSQL closed") };
                    if !self.handle(&client, tx, &mut driver, Some(first)).await? {
                        return Ok(());
                    }
                }
                _ = beat.tick() => {
                    // Read the heartbeat that came back *before* handling
                    // what is queued: every notification committed before it
                    // is then queued (or flagged as dropped) and handled now.
                    let returned = driver.beat.load(Ordering::SeqCst);
                    if !self.handle(&client, tx, &mut driver, None).await? {
                        return Ok(());
                    }
                    if let Some((number, at)) = pending {
                        if returned >= number {
                            self.current_at.store(at, Ordering::Relaxed);
                            pending = None;
                        } else if mono_ms() - at > i64::try_from(HEARTBEAT_TIMEOUT.as_millis()).unwrap_or(i64::MAX) {
                            bail!("a heartbeat did not come back through LISTEN within {HEARTBEAT_TIMEOUT:?}");
                        }
                    }
                    sent += 1;
                    let at = mono_ms();
                    self.heartbeat(&client, &beat_channel, sent).await?;
                    pending = Some(pending.map_or((sent, at), |(_, oldest)| (sent, oldest)));
                }
                () = tx.closed() => return Ok(()),
            }
        }
    }

    /// Handles the notifications queued (and `first`): the nodes they name,
    /// or every node if some were dropped, and the brokers if they changed.
    /// False if the broker stopped listening.
    async fn handle(
        &self,
        client: &tokio_postgres::Client,
        tx: &mpsc::Sender<Change>,
        driver: &mut super::connect::Driver,
        first: Option<tokio_postgres::Notification>,
    ) -> Result<bool> {
        let mut names = BTreeSet::new();
        let mut brokers_changed = false;
        for n in first.into_iter().chain(std::iter::from_fn(|| driver.notifications.try_recv().ok())) {
            match n.channel() {
                "grantline_nodes" => {
                    names.insert(n.payload().to_owned());
                }
                _ => brokers_changed = true,
            }
        }
        if driver.overflowed.swap(false, Ordering::SeqCst) {
            // Notifications were dropped: only a full read is sure.
            tracing::warn!("the fleet's change feed fell behind; reloading every node record");
            return self.reload(client, tx).await;
        }
        if !self.fetch(client, tx, names).await? {
            return Ok(false);
        }
        Ok(!brokers_changed || tx.send(Change::Brokers(brokers(client).await?)).await.is_ok())
    }

    /// Reads every node record and the brokers; false if the broker stopped listening.
    async fn reload(&self, client: &tokio_postgres::Client, tx: &mpsc::Sender<Change>) -> Result<bool> {
        let rows = client.query(&format!("SELECT {NODE_COLUMNS} FROM nodes"), &[]).await?;
        let all = rows.iter().map(node_from_row).collect::<Result<Vec<_>>>()?;
        Ok(tx.send(Change::Resync(all)).await.is_ok() && tx.send(Change::Brokers(brokers(client).await?)).await.is_ok())
    }

    /// Reads the records `names` notified; false if the broker stopped listening.
    async fn fetch(
        &self,
        client: &tokio_postgres::Client,
        tx: &mpsc::Sender<Change>,
        names: BTreeSet<String>,
    ) -> Result<bool> {
        let names: Vec<String> = names.into_iter().collect();
        for chunk in names.chunks(FETCH_BATCH) {
            let rows =
                client.query(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE name = ANY($1)"), &[&chunk]).await?;
            let changed =
                rows.iter().map(|r| Ok((node_from_row(r)?, r.try_get::<_, i64>(8)?))).collect::<Result<Vec<_>>>()?;
            if tx.send(Change::Nodes(changed)).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes this broker's heartbeat (for the others' view of who is
    /// alive) and sends heartbeat `number` to its own channel, on the feed's
    /// own connection.
    async fn heartbeat(&self, client: &tokio_postgres::Client, channel: &str, number: u64) -> Result<()> {
        let now = now_ms();
        let payload = number.to_string();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&self.broker, &now];
        let work = async {
            let n = client.execute("UPDATE brokers SET heartbeat_ms = $2 WHERE id = $1", &params).await?;
            client.execute("SELECT pg_notify($1, $2)", &[&channel, &payload]).await?;
            Ok::<_, tokio_postgres::Error>(n)
        };
        let n = match tokio::time::timeout(HEARTBEAT_TIMEOUT, work).await {
            Ok(n) => n?,
            Err(_) => bail!("PostgreSQL did not answer a heartbeat within {HEARTBEAT_TIMEOUT:?}"),
        };
        if n == 0 {
            tracing::warn!(broker = %self.broker, "this broker was retired from the fleet's table; restart it to join again");
        }
        Ok(())
    }
}

/// Milliseconds on a monotonic clock (the staleness bound must not move
/// when the wall clock is stepped).
pub fn mono_ms() -> i64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    i64::try_from(START.get_or_init(std::time::Instant::now).elapsed().as_millis()).unwrap_or(i64::MAX)
}
