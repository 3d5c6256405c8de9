//! The broker: QUIC listener, connection and stream handling, shutdown.

pub mod admin;
mod admin_peer;
pub mod admission;
pub(crate) mod anonymous;
mod handler;
mod identity;
pub mod provision;
mod revoke;
pub mod tickets;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use grantline_proto::audit::event::CallerInfo;
use grantline_proto::audit::{Event, SignerKey, VerifierKey};
use grantline_proto::{frame, wire, ALPN};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio_util::task::TaskTracker;

use crate::audit::anchor::{publish_loop, Anchor};
use crate::audit::{AuditLog, AuditReaders};
use crate::issuer::backends::Backends;
use crate::issuer::embedded::EmbeddedIssuer;
use crate::issuer::Issuer;
use crate::pki::Pki;
use crate::policy::Policy;
use crate::state::{NodeRecord, StateDb};
use crate::vault::{Intermediate, Vault, VaultIssuer, X509Mode};
use grantline_proto::files::{read_secret, write_atomic, write_secret};

pub use identity::PeerNode;

/// Everything needed to start a broker; built from `grantlined.toml` or by
/// `grantlined dev`, validated before anything binds.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub policy_path: PathBuf,
    /// The policy read from `policy_path` when the options were validated.
    pub policy: Policy,
    /// The audit log's origin when the log is created; later starts use the
    /// name in `audit.key`.
    pub origin: String,
    pub server_names: Vec<String>,
    pub identity_ttl: Duration,
    pub vault: Option<crate::vault::VaultConfig>,
    /// Where the log is published in the tlog-tiles layout (URL or directory).
    pub anchor: Option<String>,
    /// The admin API's Unix socket; none serves no admin API.
    pub admin: Option<admin::AdminOptions>,
    /// Loopback address of the Prometheus `/metrics` endpoint.
    pub metrics: Option<SocketAddr>,
    /// Admission control on handshakes.
    pub limits: admission::Limits,
}

/// Why a policy reload was refused.
#[derive(Debug)]
pub(crate) enum ReloadError {
    /// The file does not parse or validate; the old policy stays.
    Invalid(String),
    /// The new policy could not be audited, so it was not put in force.
    NotAudited(String),
}

pub(crate) struct Shared {
    pki: Arc<Pki>,
    issuer: Backends,
    vault: Option<Arc<Vault>>,
    audit: AuditLog,
    policy: RwLock<Arc<Policy>>,
    policy_path: PathBuf,
    state: StateDb,
    /// Live connections of authenticated nodes, by node and connection id.
    live: std::sync::Mutex<HashMap<String, HashMap<usize, quinn::Connection>>>,
    /// When nodes were last heard from, not yet saved to state.db.
    seen: std::sync::Mutex<HashMap<String, i64>>,
    /// The latest checkpoint and when the broker first saw it (for its age).
    checkpoint_seen: std::sync::Mutex<(Option<String>, std::time::Instant)>,
    nodes: RwLock<HashMap<String, NodeRecord>>,
    /// Held while an issued identity is checked against the node's record
    /// and recorded, so that enrollments and renewals of one name cannot
    /// interleave (revocation needs no lock: it is never undone).
    identity_commit: tokio::sync::Mutex<()>,
    /// Connections without a node identity, per address.
    anonymous: anonymous::Anonymous,
    identity_ttl: Duration,
    vkey: VerifierKey,
    requests: TaskTracker,
    handshakes: admission::Handshakes,
    limits: admission::Limits,
    /// Read-only connections to the audit database for proofs and admin
    /// reads, opened once, one per core (agents ask after every grant).
    audit_reader: Arc<AuditReaders>,
}

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
    /// Held while the broker runs: one writer per state directory.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Broker {
    /// Loads or creates keys and CAs, opens the audit log and state, binds the
    /// QUIC listener and starts the Vault tasks. Call it inside a tokio runtime.
    pub fn open(opts: &BrokerOptions) -> Result<Self> {
        std::fs::create_dir_all(&opts.state_dir)
            .with_context(|| format!("cannot create state directory {}", opts.state_dir.display()))?;
        let lock = lock_state_dir(&opts.state_dir)
            .with_context(|| format!("another grantlined is using {}; stop it first", opts.state_dir.display()))?;
        let key = load_or_create_audit_key(&opts.state_dir, &opts.origin)?;
        let vkey = key.verifier().clone();
        let pki = Arc::new(Pki::load_or_create(&opts.state_dir, &opts.server_names)?);
        let state = StateDb::open(&opts.state_dir.join("state.db"))?;
        let nodes = state.nodes()?.into_iter().map(|n| (n.name.clone(), n)).collect();
        let (audit, audit_thread) =
            AuditLog::start(&opts.state_dir.join("audit.db"), key, concat!("grantlined ", env!("CARGO_PKG_VERSION")))?;
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let audit_reader = Arc::new(AuditReaders::open(&opts.state_dir.join("audit.db"), cores)?);
        let tickets = Arc::new(tickets::TicketKeys::open(&opts.state_dir)?);
        let endpoint = bind(&opts.state_dir, server_config(&pki, tickets)?, opts.listen)?;
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
        let mut background = Vec::new();
        let (issuer, vault) = match &opts.vault {
            None => (Backends { x509: embedded.clone(), ssh: embedded, vault: None }, None),
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
                (Backends { x509, ssh, vault: Some(via_vault) }, Some(vault))
            }
        };
        let publisher = match &opts.anchor {
            Some(location) => {
                let anchor = Anchor::open(location)?;
                let db = opts.state_dir.join("audit.db");
                Some(tokio::spawn(publish_loop(anchor, db, vkey.clone(), audit.checkpoints())))
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            issuer,
            vault,
            pki,
            audit,
            policy: RwLock::new(Arc::new(opts.policy.clone())),
            policy_path: opts.policy_path.clone(),
            state,
            live: std::sync::Mutex::new(HashMap::new()),
            seen: std::sync::Mutex::new(HashMap::new()),
            checkpoint_seen: std::sync::Mutex::new((None, std::time::Instant::now())),
            nodes: RwLock::new(nodes),
            identity_commit: tokio::sync::Mutex::new(()),
            anonymous: anonymous::Anonymous::default(),
            identity_ttl: opts.identity_ttl,
            vkey,
            requests: TaskTracker::new(),
            handshakes: admission::Handshakes::default(),
            limits: opts.limits,
            audit_reader,
        });
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| tracing::warn!(error = %e, "cannot catch SIGHUP; reload the policy through the admin API"))
            .ok();
        Ok(Self { shared, endpoint, audit_thread, background, publisher, admin, metrics, hangup, _lock: lock })
    }

    /// Admission control (RFD 0008): accept, ask for a retry, or refuse.
    fn admit(&self, incoming: quinn::Incoming, connections: &TaskTracker) {
        let shared = &self.shared;
        let decision =
            admission::decide(shared.handshakes.in_flight(), incoming.remote_address_validated(), shared.limits);
        let outcome = match decision {
            admission::Decision::Accept => {
                let (shared, slot) = (shared.clone(), shared.handshakes.slot());
                connections.spawn(async move { serve_connection(shared, incoming, slot).await });
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
        if let Some(task) = metrics_task {
            task.abort();
        }
        upkeep.abort();
        // Agents wait a second, then spread their reconnects over as long
        // as the fleet takes at the configured rate (RFD 0008), so a restart
        // is not met by every node at once.
        let agents = self.shared.live.lock().map_or(0, |l| l.len());
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
        self.shared.flush_last_seen();

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

pub use grantline_audit::lock_state_dir;

/// The largest policy file read: thousands of rules.
pub const MAX_POLICY_FILE: u64 = 4 << 20;

/// The broker's private key files in its state directory.
pub const KEY_FILES: &[&str] =
    &["audit.key", "ca.key", "node-ca.key", "x509-ca.key", "ssh-ca", "quic-reset.key", "tls-tickets.key", "join-token"];

/// Refuses to start when a key file in `dir` can be read by group or
/// others: a configuration error (exit 78), found before anything binds.
pub fn check_key_files(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for name in KEY_FILES {
        let path = dir.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "key file {} has mode {mode:04o}, readable by others; run 'chmod 600 {}' (and consider the key exposed)",
                path.display(),
                path.display()
            );
        }
    }
    Ok(())
}

/// The checks a grant request passes before policy decides (kind, role,
/// names, CSR or SSH key): the broker's first parser of what a node sends,
/// public for the fuzz targets.
pub fn check_grant_request(r: &wire::GrantRequest) -> Result<(), String> {
    handler::parse_grant(r).map(|_| ())
}

pub fn load_policy(path: &Path) -> Result<Policy> {
    let text = grantline_proto::files::read_bounded(path, MAX_POLICY_FILE)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    Policy::parse(&text).with_context(|| format!("policy file {} is invalid", path.display()))
}

pub(crate) fn load_or_create_audit_key(dir: &Path, origin: &str) -> Result<SignerKey> {
    let path = dir.join("audit.key");
    let key = if path.exists() {
        SignerKey::parse(&read_secret(&path)?)
            .with_context(|| format!("{} is not a signed-note private key", path.display()))?
    } else {
        grantline_proto::audit::key::check_origin(origin)?;
        let key = SignerKey::generate(origin)?;
        write_secret(&path, key.to_private_string().as_bytes())?;
        key
    };
    write_atomic(&dir.join("audit.vkey"), format!("{}\n", key.verifier()).as_bytes(), 0o644)?;
    Ok(key)
}

/// Binds the QUIC endpoint with a stateless-reset key kept in the state
/// directory: after a restart (even a SIGKILL) the broker answers packets of
/// connections it no longer knows with a reset the agents recognize, so they
/// reconnect at once instead of waiting out the idle timeout.
fn bind(dir: &Path, cfg: quinn::ServerConfig, listen: SocketAddr) -> Result<quinn::Endpoint> {
    let path = dir.join("quic-reset.key");
    let secret = if path.exists() {
        hex::decode(read_secret(&path)?.trim())
            .ok()
            .filter(|k| k.len() == 32)
            .with_context(|| format!("{} is not 32 hex-encoded bytes", path.display()))?
    } else {
        let k = rand::random::<[u8; 32]>().to_vec();
        write_secret(&path, hex::encode(&k).as_bytes())?;
        k
    };
    let reset_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
    // Connection IDs carry a MAC under a key derived from the same secret, so
    // a restarted broker still recognizes its old IDs as its own and answers
    // them with a stateless reset instead of dropping them.
    let cid_key = u64::from_be_bytes(
        aws_lc_rs::hmac::sign(&reset_key, b"grantline quic connection id key").as_ref()[..8].try_into()?,
    );
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    let socket = std::net::UdpSocket::bind(listen)
        .with_context(|| format!("cannot listen on {listen} (is another broker running there?)"))?;
    // Every agent shares this one socket: a reconnect storm's Initial packets
    // arrive in bursts that overflow the default buffer, and each one dropped
    // costs its agent a retransmission timeout. The kernel caps the request
    // at net.core.rmem_max.
    if let Err(e) = nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBuf, &UDP_RECEIVE_BUFFER) {
        tracing::warn!(error = %e, "cannot enlarge the UDP receive buffer");
    }
    Ok(quinn::Endpoint::new(endpoint_config, Some(cfg), socket, Arc::new(quinn::TokioRuntime))?)
}

/// The UDP receive buffer asked for (the kernel grants up to rmem_max).
const UDP_RECEIVE_BUFFER: usize = 8 << 20;

fn server_config(pki: &Pki, tickets: Arc<tickets::TicketKeys>) -> Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.node_ca.cert_der.clone())?;
    // Enrollment happens before a node has a certificate, so a handshake
    // without one is allowed; every request but Enroll then requires one.
    // A certificate that is presented must chain to the node CA.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // Reconnecting agents resume their sessions, across restarts too.
    tls.ticketer = tickets;
    tls.send_tls13_tickets = 1;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(8u32.into())
        .max_concurrent_uni_streams(0u32.into())
        // A request of the largest legal size, or twice that (which is
        // answered with an error), fits in one flight.
        .stream_receive_window(u32::try_from(4 * frame::MAX_FRAME_LEN)?.into())
        .receive_window(u32::try_from(16 * frame::MAX_FRAME_LEN)?.into())
        .send_window(16 * frame::MAX_FRAME_LEN as u64)
        // Replies are a few kilobytes: segmentation offload would only
        // size every connection's transmit buffer for ten datagrams.
        .enable_segmentation_offload(false)
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0)
        .max_idle_timeout(Some(Duration::from_secs(60).try_into()?));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

async fn serve_connection(shared: Arc<Shared>, incoming: quinn::Incoming, slot: admission::Slot) {
    let remote = incoming.remote_address();
    let handshake = tokio::time::timeout(Duration::from_secs(10), async { incoming.accept()?.await }).await;
    drop(slot);
    let conn = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            metrics::counter!("grantline_handshakes_total", "outcome" => "failed").increment(1);
            tracing::info!(%remote, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            metrics::counter!("grantline_handshakes_total", "outcome" => "timed_out").increment(1);
            tracing::info!(%remote, "handshake timed out");
            return;
        }
    };
    let peer = PeerNode::from_connection(&conn);
    tracing::debug!(%remote, node = peer.as_ref().map(|p| p.name.as_str()), "connected");
    let _counted = ConnectionGauge::new();
    if peer.is_none() {
        serve_anonymous(&shared, &conn, remote).await;
        return;
    }
    let _registered = peer.as_ref().map(|p| Registration::new(&shared, p, &conn));
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let shared2 = shared.clone();
                let peer = peer.clone();
                shared.requests.spawn(async move { serve_stream(shared2, peer, send, recv).await });
            }
            Err(e) => {
                tracing::debug!(%remote, reason = %e, "connection closed");
                break;
            }
        }
    }
}

/// A connection without a node identity: admitted within the per-address
/// and overall limits, it may carry one request (an enrollment) within
/// `anonymous::WINDOW`, then it is closed.
async fn serve_anonymous(shared: &Arc<Shared>, conn: &quinn::Connection, remote: std::net::SocketAddr) {
    let Some(_slot) = shared.anonymous.admit(remote.ip()) else {
        metrics::counter!("grantline_anonymous_refused_total").increment(1);
        let e = wire::Error::new(
            wire::ErrorCode::Unavailable,
            format!(
                "too many connections without a node identity from {} (at most {} at once, {} in all); \
                 enroll one node at a time",
                remote.ip(),
                anonymous::PER_ADDRESS,
                anonymous::IN_ALL
            ),
        );
        revoke::close_with(conn, &e);
        return;
    };
    if let Ok(Ok((send, recv))) = tokio::time::timeout(anonymous::WINDOW, conn.accept_bi()).await {
        let served = shared.requests.spawn(serve_stream(shared.clone(), None, send, recv));
        let _ = served.await;
    }
    conn.close(0u32.into(), b"one request per connection without a node identity");
}

async fn serve_stream(
    shared: Arc<Shared>,
    peer: Option<PeerNode>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let reply = match tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(frame::MAX_FRAME_LEN + 16)).await {
        Err(_) => {
            error(wire::ErrorCode::BadRequest, "request not received within 10 s; send one frame and finish the stream")
        }
        Ok(Err(quinn::ReadToEndError::TooLong)) => {
            error(wire::ErrorCode::BadRequest, format!("request larger than {} bytes", frame::MAX_FRAME_LEN))
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "stream failed before a request arrived");
            return;
        }
        Ok(Ok(buf)) => match frame::decode::<wire::Request>(&buf) {
            Ok(req) => handler::handle(&shared, peer.as_ref(), req).await,
            Err(e) => error(wire::ErrorCode::BadRequest, e.to_string()),
        },
    };
    if send.write_all(&frame::encode(&reply)).await.is_ok() {
        let _ = send.finish();
        // Keep the stream alive until the peer has the reply or goes away.
        let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
    }
}

/// A node's connection in `Shared::live` while it is up. Registered before
/// the revocation flag is checked, so `revoke_node` (which sets the flag,
/// then drains `live`) either finds the connection or the connection finds
/// the flag.
struct Registration<'a> {
    shared: &'a Shared,
    node: String,
    id: usize,
}

/// Connections one node may hold at once (an agent needs one; a few more
/// cover reconnects racing the old connection's close).
const MAX_CONNECTIONS_PER_NODE: usize = 8;

impl<'a> Registration<'a> {
    /// Registers the connection of `peer`, then closes it at once if the
    /// node is revoked, is not enrolled, presents an identity that is no
    /// longer its own, or already holds its share of connections.
    fn new(shared: &'a Shared, peer: &PeerNode, conn: &quinn::Connection) -> Self {
        let node = peer.name.as_str();
        let id = conn.stable_id();
        let held = {
            let mut live = shared.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let conns = live.entry(node.to_owned()).or_default();
            conns.insert(id, conn.clone());
            conns.len()
        };
        shared.mark_seen(node);
        let refusal = {
            let nodes = shared.nodes.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            match nodes.get(node) {
                Some(n) if n.revoked => Some((wire::ErrorCode::Revoked, format!("node {node} has been revoked"))),
                None => {
                    Some((wire::ErrorCode::Unauthenticated, format!("node {node} is not enrolled with this broker")))
                }
                Some(n) if !n.speaks_for(&peer.serial) => {
                    Some((wire::ErrorCode::Unauthenticated, crate::state::replaced_identity(node, &peer.serial)))
                }
                _ if held > MAX_CONNECTIONS_PER_NODE => Some((
                    wire::ErrorCode::Unavailable,
                    format!("node {node} already holds {MAX_CONNECTIONS_PER_NODE} connections; use one"),
                )),
                Some(n) if peer.serial == n.serial && !n.current_seen => {
                    drop(nodes);
                    if let Some(n) =
                        shared.nodes.write().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(node)
                    {
                        if n.serial == peer.serial {
                            n.current_seen = true;
                        }
                    }
                    None
                }
                Some(_) => None,
            }
        };
        if let Some((code, message)) = refusal {
            revoke::close_with(conn, &wire::Error::new(code, message));
        }
        Self { shared, node: node.to_owned(), id }
    }
}

/// Counts a connection in `grantline_connections` while it is up.
struct ConnectionGauge;

impl ConnectionGauge {
    fn new() -> Self {
        metrics::gauge!("grantline_connections").increment(1.0);
        Self
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!("grantline_connections").decrement(1.0);
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut live = self.shared.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(conns) = live.get_mut(&self.node) {
            conns.remove(&self.id);
            if conns.is_empty() {
                live.remove(&self.node);
            }
        }
        drop(live);
        self.shared.mark_seen(&self.node);
    }
}

impl Shared {
    fn mark_seen(&self, node: &str) {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node.to_owned(), handler::now_unix());
    }

    /// Notes when the latest checkpoint first appeared.
    fn track_checkpoint(&self) {
        let latest = self.audit.checkpoints().borrow().clone();
        let mut seen = self.checkpoint_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if latest.is_some() && seen.0 != latest {
            *seen = (latest, std::time::Instant::now());
        }
    }

    /// Gauges computed when /metrics is scraped.
    fn refresh_gauges(&self) {
        self.track_checkpoint();
        let age = self.checkpoint_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).1.elapsed();
        metrics::gauge!("grantline_checkpoint_age_seconds").set(age.as_secs_f64());
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("grantline_audit_entries").set(*self.audit.size().borrow() as f64);
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("grantline_handshakes_in_flight").set(self.handshakes.in_flight() as f64);
    }

    /// Saves last-seen times to state.db in one transaction.
    fn flush_last_seen(&self) {
        let seen: Vec<(String, i64)> =
            self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain().collect();
        if seen.is_empty() {
            return;
        }
        {
            let mut nodes = self.nodes.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (name, at) in &seen {
                if let Some(n) = nodes.get_mut(name) {
                    n.last_seen = n.last_seen.max(*at);
                }
            }
        }
        if let Err(e) = self.state.save_last_seen(&seen) {
            tracing::warn!(error = %e, "cannot save when nodes were last seen");
        }
    }

    /// Creates a join token and audits its creation; a token whose creation
    /// is not in the log is withdrawn and never handed out.
    pub(crate) async fn issue_join_token(
        &self,
        node: Option<&str>,
        labels: BTreeMap<String, String>,
        ttl: Duration,
        admin: CallerInfo,
    ) -> Result<crate::state::NewToken, String> {
        let token = self
            .state
            .create_token(node, &labels, ttl, handler::now_unix())
            .map_err(|e| format!("cannot store the token: {e:#}"))?;
        let event = Event::TokenCreation {
            token_id: token.id.clone(),
            node: node.unwrap_or_default().to_owned(),
            labels,
            expires_at: token.expires_at,
            admin,
        };
        if let Err(e) = self.audit.append(event).await {
            if let Err(d) = self.state.delete_token(&token.id) {
                tracing::error!(error = %d, token = %token.id, "cannot withdraw an unaudited join token");
            }
            return Err(format!("not audited: {e}"));
        }
        tracing::info!(token = %token.id, node = node.unwrap_or_default(), "join token created");
        Ok(token)
    }

    /// Re-reads the policy file; see `ReloadError`.
    pub(crate) async fn reload_policy(
        &self,
        admin: Option<CallerInfo>,
    ) -> Result<grantline_proto::admin::ReloadPolicyResponse, ReloadError> {
        let current = self.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        // Reading and parsing a large file is blocking work: off the workers
        // that serve agents.
        let path = self.policy_path.clone();
        let loaded = tokio::task::spawn_blocking(move || load_policy(&path))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the policy loader failed: {e}")));
        match loaded {
            Err(e) => {
                let error = format!("{e:#}");
                metrics::counter!("grantline_policy_reloads_total", "outcome" => "refused").increment(1);
                let event =
                    Event::PolicyReload { ok: false, policy: current.hash().into(), error: error.clone(), admin };
                if let Err(audit) = self.audit.append(event).await {
                    tracing::error!(error = %audit, "could not audit a refused policy reload");
                }
                tracing::warn!(%error, "policy reload refused; the old policy stays in force");
                Err(ReloadError::Invalid(format!(
                    "{error}; the policy in force is unchanged (sha256 {})",
                    current.hash()
                )))
            }
            Ok(policy) => {
                let event = Event::PolicyReload { ok: true, policy: policy.hash().into(), error: String::new(), admin };
                if let Err(e) = self.audit.append(event).await {
                    metrics::counter!("grantline_policy_reloads_total", "outcome" => "refused").increment(1);
                    return Err(ReloadError::NotAudited(format!(
                        "the new policy was not put in force because it could not be audited: {e}"
                    )));
                }
                let changed = policy.hash() != current.hash();
                let response = grantline_proto::admin::ReloadPolicyResponse {
                    policy_hash: policy.hash().into(),
                    rules: u32::try_from(policy.rule_count()).unwrap_or(u32::MAX),
                    changed,
                };
                *self.policy.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
                metrics::counter!("grantline_policy_reloads_total", "outcome" => "ok").increment(1);
                tracing::info!(hash = %response.policy_hash, changed, "policy reloaded");
                Ok(response)
            }
        }
    }
}

/// Periodic chores: noting new checkpoints (for their age), last-seen times
/// to disk. Holds only a weak handle, so it never keeps the broker's state
/// alive at shutdown.
async fn upkeep(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else { return };
        shared.track_checkpoint();
        if n % 30 == 29 {
            tokio::task::block_in_place(|| shared.flush_last_seen());
        }
    }
}

fn error(code: wire::ErrorCode, msg: impl Into<String>) -> wire::Response {
    wire::Response { body: Some(wire::response::Body::Error(wire::Error::new(code, msg))) }
}
