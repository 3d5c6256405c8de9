//! A running broker: `Broker::open` loads or creates its keys and state,
//! binds its sockets and starts its background tasks; `Broker::run` serves
//! until its shutdown future resolves, then stops in order (RFD 0001).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use grantline_proto::audit::event::CallerInfo;
use grantline_proto::audit::VerifierKey;
use grantline_proto::wire;
use tokio_util::task::TaskTracker;

use super::options::BrokerOptions;
use super::quic::{bind, serve_connection, server_config};
use super::shared::{upkeep, Shared};
use super::state_dir::{
    key_history, load_endorsement, load_node_ca_endorsement, load_or_create_audit_key, lock_state_dir, node_ca_endorsed,
};
use super::{admin, admission, anonymous, fleet, presence, tickets};
use crate::audit::anchor::Anchor;
use crate::audit::publisher::publish_loop;
use crate::audit::{AuditLog, AuditReaders};
use crate::grant::{GrantService, SystemClock};
use crate::issuer::backends::Backends;
use crate::issuer::embedded::EmbeddedIssuer;
use crate::issuer::svid::SvidIssuer;
use crate::issuer::Issuer;
use crate::pki::Pki;
use crate::registry::Registry;
use crate::state::{PgStore, StateDb, StateStore, ThisBroker};
use crate::vault::{Intermediate, Vault, VaultIssuer, X509Mode};

pub struct Broker {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    audit_thread: std::thread::JoinHandle<()>,
    /// Vault token renewal and intermediate rotation.
    background: Vec<tokio::task::JoinHandle<()>>,
    /// Anchoring; it ends by itself once the writer's last checkpoint is out.
    publisher: Option<tokio::task::JoinHandle<()>>,
    admin: Option<(tokio::net::UnixListener, Option<u32>, PathBuf)>,
    /// SIGHUP (policy reload), caught from `open` on so that a reload sent
    /// right after readiness never falls to the default action.
    hangup: Option<tokio::signal::unix::Signal>,
    metrics: Option<(std::net::TcpListener, metrics_exporter_prometheus::PrometheusHandle)>,
    /// The trust domain's OIDC discovery endpoint (RFD 0011), and its issuer URL.
    oidc: Option<super::oidc::Oidc>,
    oidc_issuer: Option<String>,
    /// Held while the broker runs: one writer per state directory.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Broker {
    /// Loads or creates keys and CAs, opens the audit log and state, binds the
    /// QUIC listener and starts the Vault tasks. Call it inside a tokio runtime.
    pub async fn open(opts: &BrokerOptions) -> Result<Self> {
        std::fs::create_dir_all(&opts.state_dir)
            .with_context(|| format!("cannot create state directory {}", opts.state_dir.display()))?;
        let lock = lock_state_dir(&opts.state_dir)
            .with_context(|| format!("another grantlined is using {}; stop it first", opts.state_dir.display()))?;
        let key = load_or_create_audit_key(&opts.state_dir, &opts.origin)?;
        let vkey = key.verifier().clone();
        let pki = Arc::new(Pki::load_or_create(&opts.state_dir, &opts.server_names)?);
        let endorsed = load_endorsement(&opts.state_dir)?;
        if opts.database.is_some() && endorsed.is_none() {
            anyhow::bail!(
                "{} has not joined a fleet (no audit.endorsement): the other brokers would refuse its nodes and agents its receipts; prepare an empty state directory with 'grantlined fleet join'",
                opts.state_dir.display()
            );
        }
        let (endorsement, fleet_vkey) = endorsed.map_or((None, None), |(e, k)| (Some(e), Some(k)));
        let (state, registry, fleet): (Arc<dyn StateStore>, _, _) = match &opts.database {
            None => {
                let state = StateDb::open(&opts.state_dir.join("state.db"))?;
                let registry = Arc::new(Registry::new(state.nodes()?));
                (Arc::new(state), registry, None)
            }
            Some(cfg) => {
                let me = ThisBroker {
                    id: vkey.name().to_owned(),
                    node_ca: pki.node_ca.cert_pem.clone(),
                    node_ca_endorsement: load_node_ca_endorsement(&opts.state_dir)?
                        .filter(|e| fleet_vkey.as_ref().is_some_and(|k| node_ca_endorsed(k, &pki.node_ca.cert_der, e)))
                        .context("node-ca.endorsement is missing or not the fleet key's over node-ca.pem; run 'grantlined fleet join' for an empty state directory")?,
                    audit_key: vkey.to_string(),
                };
                let store = PgStore::open(cfg, me).await?;
                let registry = Arc::new(Registry::new(store.all_nodes().await?));
                (Arc::new(store.clone()), registry, Some(store))
            }
        };
        let (audit, audit_thread) = AuditLog::start_endorsed(
            &opts.state_dir.join("audit.db"),
            key,
            concat!("grantlined ", env!("CARGO_PKG_VERSION")),
            endorsement,
        )?;
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let audit_reader = Arc::new(AuditReaders::open(&opts.state_dir.join("audit.db"), cores)?);
        let tickets = Arc::new(tickets::TicketKeys::open(&opts.state_dir)?);
        let brokers = match &fleet {
            Some(store) => store.brokers().await?,
            None => Vec::new(),
        };
        let endpoint = bind(
            &opts.state_dir,
            server_config(&pki, &fleet::node_cas(&pki, &brokers, fleet_vkey.as_ref()), tickets.clone())?,
            opts.listen,
        )?;
        let admin = match &opts.admin {
            Some(a) => {
                let (listener, gid) = admin::bind(a)?;
                Some((listener, gid, a.socket.clone()))
            }
            None => None,
        };
        let metrics = match opts.metrics {
            Some(addr) => Some((crate::metrics::bind(addr)?, crate::metrics::install()?)),
            None => None,
        };
        let embedded: Arc<dyn Issuer> = Arc::new(EmbeddedIssuer::new(pki.clone()));
        let (spiffe, oidc) = match &opts.spiffe {
            None => (None, None),
            Some(s) => {
                let jwt = crate::spiffe::JwtKey::load_or_create(&opts.state_dir)?;
                let oidc = s.oidc.as_ref().map(|o| super::oidc::bind(o, &opts.state_dir, &jwt)).transpose()?;
                let iss = oidc.as_ref().map(|o| o.issuer.clone()).unwrap_or_default();
                let svids = SvidIssuer::new(pki.clone(), jwt, s.trust_domain.clone(), iss);
                (Some(Arc::new(svids) as Arc<dyn Issuer>), oidc)
            }
        };
        let mut background = Vec::new();
        let (issuer, vault) = match &opts.vault {
            None => (Backends { x509: embedded.clone(), ssh: embedded, vault: None, spiffe }, None),
            Some(cfg) => {
                let vault = Vault::new(cfg.clone())?;
                background.push(tokio::spawn(vault.clone().maintain_token()));
                let via_vault: Arc<dyn Issuer> = Arc::new(VaultIssuer::new(vault.clone()));
                let x509 = match cfg.x509 {
                    X509Mode::Vault => via_vault.clone(),
                    X509Mode::Embedded => embedded.clone(),
                    X509Mode::Intermediate => {
                        let intermediate = Intermediate::new(vault.clone(), audit.clone());
                        background.push(tokio::spawn(intermediate.clone().maintain()));
                        intermediate
                    }
                };
                let ssh = if cfg.ssh_via_vault { via_vault.clone() } else { embedded };
                (Backends { x509, ssh, vault: Some(via_vault), spiffe }, Some(vault))
            }
        };
        let publisher = match &opts.anchor {
            Some(a) => {
                let mut anchor = Anchor::open(&a.location, &a.access)?;
                // A fleet's brokers share one anchor, each under its origin.
                if opts.database.is_some() {
                    anchor = anchor.for_origin(vkey.name());
                }
                let db = opts.state_dir.join("audit.db");
                let keys = key_history(&opts.state_dir, &vkey);
                Some(tokio::spawn(publish_loop(anchor, db, keys, audit.checkpoints(), a.heartbeat)))
            }
            None => None,
        };
        let grants = GrantService {
            issuer: Arc::new(issuer),
            audit: Arc::new(audit.clone()),
            state: state.clone(),
            clock: Arc::new(SystemClock),
            nodes: registry.clone(),
            trust_domain: opts.spiffe.as_ref().map(|s| s.trust_domain.clone()),
        };
        let shared = Arc::new(Shared {
            grants,
            vault,
            pki,
            audit,
            policy: RwLock::new(Arc::new(opts.policy.clone())),
            policy_path: opts.policy_path.clone(),
            state,
            checkpoint_seen: std::sync::Mutex::new((None, std::time::Instant::now())),
            registry,
            identity_commit: tokio::sync::Mutex::new(()),
            anonymous: anonymous::Anonymous::default(),
            identity_ttl: opts.identity_ttl,
            vkey,
            fleet_vkey,
            requests: TaskTracker::new(),
            handshakes: admission::Handshakes::default(),
            limits: opts.limits,
            audit_reader,
            fleet: fleet.clone().map(presence::Fleet::new),
        });
        if let Some(store) = &fleet {
            let feed = store.watch();
            background.push(tokio::spawn(fleet::follow(Arc::downgrade(&shared), feed, endpoint.clone(), tickets)));
        }
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| tracing::warn!(error = %e, "cannot catch SIGHUP; reload the policy through the admin API"))
            .ok();
        let oidc_issuer = oidc.as_ref().map(|o| o.issuer.clone());
        Ok(Self {
            shared,
            endpoint,
            audit_thread,
            background,
            publisher,
            admin,
            metrics,
            oidc,
            oidc_issuer,
            hangup,
            _lock: lock,
        })
    }

    /// Admission control (RFD 0008): accept, ask for a retry, or refuse.
    fn admit(&self, incoming: quinn::Incoming, connections: &TaskTracker) {
        let shared = &self.shared;
        let decision =
            admission::decide(shared.handshakes.in_flight(), incoming.remote_address_validated(), shared.limits);
        let outcome = match decision {
            admission::Decision::Accept => {
                let (shared, slot) = (shared.clone(), shared.handshakes.slot());
                connections.spawn(serve_connection(shared, incoming, slot));
                "accepted"
            }
            admission::Decision::Retry => match incoming.retry() {
                Ok(()) => "retried",
                // Only a validated sender cannot be retried, and those are
                // accepted above; refuse rather than accept past the check.
                Err(e) => {
                    e.into_incoming().refuse();
                    "refused"
                }
            },
            admission::Decision::Refuse => {
                tracing::debug!(remote = %incoming.remote_address(), "handshake refused: too many in flight");
                incoming.refuse();
                "refused"
            }
        };
        metrics::counter!("grantline_handshakes_total", "outcome" => outcome).increment(1);
    }

    /// The OIDC issuer URL of the trust domain, if this broker serves one.
    pub fn oidc_issuer(&self) -> Option<&str> {
        self.oidc_issuer.as_deref()
    }

    /// Where the metrics endpoint listens, if it does.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    pub fn verifier_key(&self) -> &VerifierKey {
        &self.shared.vkey
    }

    /// Creates a join token in this broker's state.
    /// A join token that pins no name (what `grantlined dev` hands out at
    /// start), audited like one an admin creates, with the broker itself as
    /// the admin.
    pub async fn create_token(&self, ttl: Duration) -> Result<String> {
        let me = CallerInfo {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            pid: std::process::id(),
            exe: std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
            unit: String::new(),
        };
        Ok(self.shared.issue_join_token(None, BTreeMap::new(), ttl, me).await.map_err(anyhow::Error::msg)?.token)
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests finish (up to 10 s), closes connections and flushes the log.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let connections = TaskTracker::new();
        let stop_admin = tokio_util::sync::CancellationToken::new();
        let admin_task = self.admin.take().map(|(listener, gid, path)| {
            let stop = stop_admin.clone();
            let task = tokio::spawn(admin::serve(self.shared.clone(), listener, gid, stop.cancelled_owned()));
            (task, path)
        });
        let metrics_task = self.metrics.take().map(|(l, h)| {
            let shared = Arc::downgrade(&self.shared);
            let refresh: crate::metrics::Refresh = Arc::new(move || {
                if let Some(shared) = shared.upgrade() {
                    shared.refresh_gauges();
                }
            });
            tokio::spawn(crate::metrics::serve(l, h, refresh))
        });
        let oidc_task = self.oidc.take().map(|o| tokio::spawn(super::oidc::serve(o)));
        let upkeep = tokio::spawn(upkeep(Arc::downgrade(&self.shared)));
        let mut hangup = self.hangup.take();
        // systemd's watchdog (WatchdogSec=): pinged from this loop at half
        // the interval, so a loop that stops turning gets the broker restarted.
        let watchdog = sd_notify::watchdog_enabled();
        let mut ping = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| d / 2));
        tokio::pin!(shutdown);
        // The audit writer is the broker's reason to exist: if its thread
        // ends (a panic, a fatal storage error), nothing can be issued, so
        // the broker stops with an error and systemd restarts it.
        let mut writer_check = tokio::time::interval(Duration::from_secs(1));
        let mut writer_died = false;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = writer_check.tick() => {
                    if self.audit_thread.is_finished() {
                        tracing::error!("the audit writer stopped; the broker stops too, so that it is restarted");
                        writer_died = true;
                        break;
                    }
                }
                _ = ping.tick(), if watchdog.is_some() => {
                    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]) {
                        tracing::warn!(error = %e, "cannot ping the systemd watchdog");
                    }
                }
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP received: reloading the policy");
                    if let Err(e) = self.shared.reload_policy(None).await {
                        tracing::error!(error = ?e, "policy reload refused; the old policy stays in force");
                    }
                }
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    self.admit(incoming, &connections);
                }
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        self.endpoint.set_server_config(None);
        self.shared.requests.close();
        if tokio::time::timeout(Duration::from_secs(10), self.shared.requests.wait()).await.is_err() {
            tracing::warn!("in-flight requests did not finish within 10 s; closing anyway");
        }
        stop_admin.cancel();
        if let Some((task, path)) = admin_task {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            let _ = std::fs::remove_file(path);
        }
        for task in metrics_task.into_iter().chain(oidc_task) {
            task.abort();
        }
        upkeep.abort();
        // Agents wait a second, then spread their reconnects over as long
        // as the fleet takes at the configured rate (RFD 0008), so a restart
        // is not met by every node at once.
        let agents = self.shared.registry.connected_nodes();
        let spread = admission::reconnect_spread(agents, self.shared.limits.reconnects_per_second);
        let bye = wire::Error {
            code: wire::ErrorCode::Unavailable as i32,
            message: "broker shutting down".into(),
            retryable: true,
            retry_after_ms: 1000,
            retry_spread_ms: u32::try_from(spread.as_millis()).unwrap_or(u32::MAX),
        };
        tracing::info!(agents, spread = ?spread, "closing agent connections; they reconnect over the spread");
        self.endpoint.close((wire::ErrorCode::Unavailable as u32).into(), &prost::Message::encode_to_vec(&bye));
        self.shared.flush_last_seen().await;

        connections.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        // Background tasks (Vault token, intermediate rotation) may hold
        // handles to the audit log: stop them first, so that dropping the
        // last handle lets the writer drain, sign its final checkpoint and exit.
        // What Vault answers late for requests the broker gave up on is
        // revoked before the broker goes.
        if let Some(vault) = &self.shared.vault {
            vault.drain(Duration::from_secs(10)).await;
        }
        for task in &self.background {
            task.abort();
        }
        for task in self.background {
            let _ = task.await;
        }
        drop(self.shared);
        tokio::task::spawn_blocking(move || self.audit_thread.join()).await.ok();
        // The writer's final checkpoint is out; give the publisher a moment
        // to anchor it.
        if let Some(publisher) = self.publisher {
            let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
        }
        if writer_died {
            anyhow::bail!("the audit writer stopped unexpectedly; nothing could be audited, so the broker exited");
        }
        tracing::info!("stopped");
        Ok(())
    }
}
