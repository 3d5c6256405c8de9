//! `grantline-agent run`: one persistent QUIC connection to the broker, kept up
//! with backoff and full jitter; identity renewal at half-life ± 10 %; and the
//! local socket that workloads call.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grantline_proto::audit::event::vault_fingerprint;
use grantline_proto::audit::{receipt, Event, VerifierKey};
use grantline_proto::kind::Kind;
use grantline_proto::slots::{Slot, Slots};
use grantline_proto::wire::{self, local_request::Body as LocalReq, local_response::Body as LocalResp};
use grantline_proto::wire::{request::Body as Req, response::Body as Resp};
use grantline_proto::{frame, wire::ErrorCode};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};

use crate::broker::{call, CallError};
use crate::config::{AgentConfigFile, Caller};
use crate::enroll::{check_identity, key_and_csr};
use crate::local::{caller_of, read_frame};
use crate::renew::{backoff, renew_at};
use crate::state::{AgentConfig, AgentState, Identity};
use crate::tls;

pub struct RunArgs {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// How long a grant may go without being proved included in a checkpoint
    /// before the agent reports it.
    pub inclusion_deadline: Duration,
    /// agent.toml: local caller policy, sinks, re-enrollment token file.
    pub config: AgentConfigFile,
}

/// A grant whose inclusion in a checkpoint is not confirmed yet.
struct Unconfirmed {
    seq: u64,
    leaf: grantline_proto::audit::Hash,
    granted: std::time::Instant,
}

pub(crate) struct Agent {
    state_dir: PathBuf,
    policy: AgentConfigFile,
    /// Set when the broker closed the connection because the node was revoked.
    revoked: std::sync::atomic::AtomicBool,
    config: AgentConfig,
    ca_pem: String,
    /// The broker's audit key: pinned at enrollment, moved forward when a
    /// receipt proves a rotation.
    audit_key: RwLock<VerifierKey>,
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    identity: RwLock<Identity>,
    /// The TLS client for the current identity, kept across reconnects so
    /// that its session tickets let the agent resume (RFD 0008).
    client: std::sync::Mutex<Option<(Vec<u8>, quinn::ClientConfig)>>,
    conn: watch::Sender<Option<quinn::Connection>>,
    renewed: Notify,
    unconfirmed: std::sync::Mutex<Vec<Unconfirmed>>,
    inclusion_deadline: Duration,
}

/// Prints a progress line on stdout for supervisors and tests, flushed.
fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

use grantline_proto::clock::now_unix as now;

pub async fn run(args: RunArgs, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let state = AgentState::load(&args.state_dir)?;
    if state.identity.not_after <= now() {
        tracing::warn!(
            token_file = %args.config.join_token_file.display(),
            "the node identity expired; the agent re-enrolls with a join token from the token file"
        );
    }
    let addr = tls::resolve(&state.config.broker)?;
    let listener = bind_socket(&args.socket, args.config.socket_mode)?;
    let sinks = args.config.sinks.clone();
    let agent = Arc::new(Agent {
        state_dir: args.state_dir.clone(),
        policy: args.config,
        revoked: std::sync::atomic::AtomicBool::new(false),
        addr,
        endpoint: tls::endpoint_for(addr)?,
        config: state.config,
        ca_pem: state.ca_pem,
        audit_key: RwLock::new(state.audit_key),
        identity: RwLock::new(state.identity),
        client: std::sync::Mutex::new(None),
        conn: watch::channel(None).0,
        renewed: Notify::new(),
        unconfirmed: std::sync::Mutex::new(Vec::new()),
        inclusion_deadline: args.inclusion_deadline,
    });
    announce(&format!("grantline-agent ready on {}", args.socket.display()));
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd of readiness");
    }
    tracing::info!(node = %agent.config.node_name, broker = %agent.config.broker, "agent running");
    let result = tokio::select! {
        () = maintain_connection(agent.clone()) => Ok(()),
        () = renew_identity_loop(agent.clone()) => Ok(()),
        () = confirm_inclusion_loop(agent.clone()) => Ok(()),
        r = serve_socket(agent.clone(), listener) => r,
        () = crate::sinks::keep_all(agent.clone(), sinks) => Ok(()),
        () = watchdog() => Ok(()),
        () = shutdown => Ok(()),
    };
    let _ = std::fs::remove_file(&args.socket);
    if let Some(c) = agent.conn.borrow().as_ref() {
        c.close(0u32.into(), b"agent stopping");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), agent.endpoint.wait_idle()).await;
    result
}

/// Pings systemd's watchdog at half its interval while the runtime turns;
/// pending forever without one.
async fn watchdog() {
    let Some(every) = sd_notify::watchdog_enabled() else { return std::future::pending().await };
    let mut tick = tokio::time::interval(every / 2);
    loop {
        tick.tick().await;
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]) {
            tracing::warn!(error = %e, "cannot ping the systemd watchdog");
        }
    }
}

fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        // A socket nobody answers on is left over from an earlier run.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another agent is already serving {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    // Who may ask for what is decided per caller by agent.toml's [[allow]]
    // rules (from SO_PEERCRED), then by the broker's policy; the mode only
    // narrows who may connect at all.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

fn jitter_unit() -> f64 {
    rand::thread_rng().gen::<f64>()
}

/// What the broker said when it closed the connection: a `wire::Error`
/// encoded in the QUIC application close reason.
pub fn close_reason(e: &quinn::ConnectionError) -> Option<wire::Error> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => prost::Message::decode(c.reason.as_ref()).ok(),
        _ => None,
    }
}

/// The longest retry-after or spread the agent honours (a broker asks for
/// at most 10 minutes of spread, RFD 0008).
pub(crate) const MAX_BROKER_WAIT: Duration = Duration::from_secs(600);

/// The wait a refused handshake asks for, if `e` is one: the broker's
/// admission control had too many handshakes in flight (RFD 0008).
pub fn refused_retry_after(e: &quinn::ConnectionError) -> Option<Duration> {
    match e {
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            Some(grantline_proto::REFUSED_RETRY_AFTER)
        }
        _ => None,
    }
}

/// How long to wait before reconnecting: full-jitter backoff, but never
/// sooner than a retry-after the broker asked for (plus up to that much
/// again, so a restarting broker is not met by every agent at once). A
/// broker that names a spread (a restart under a large fleet) gets its
/// retry-after plus a uniform share of the spread instead.
pub fn reconnect_wait(attempt: u32, retry_after: Duration, spread: Duration, unit: f64) -> Duration {
    // What a broker asks for is bounded by what a broker would ask for: a
    // corrupt or hostile close reason cannot park the agent for weeks.
    let (retry_after, spread) = (retry_after.min(MAX_BROKER_WAIT), spread.min(MAX_BROKER_WAIT));
    let unit = unit.clamp(0.0, 1.0);
    let jittered = backoff(attempt, Duration::from_millis(200), Duration::from_secs(30), unit);
    if !spread.is_zero() {
        retry_after + spread.mul_f64(unit)
    } else if retry_after.is_zero() {
        jittered
    } else {
        retry_after + retry_after.mul_f64(unit).max(jittered)
    }
}

/// A connection that lived this long resets the reconnection backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// The backoff step at which a shut-out identity retries: waits of up to
/// the 30 s cap.
const SHUT_OUT_ATTEMPT: u32 = 8;

async fn maintain_connection(agent: Arc<Agent>) {
    let mut attempt = 0u32;
    loop {
        let (mut retry_after, mut spread) = (Duration::ZERO, Duration::ZERO);
        if agent.identity.read().map(|i| i.not_after <= now()).unwrap_or(false) {
            if let Err(e) = crate::recover::reenroll(&agent).await {
                tracing::warn!(error = %format!("{e:#}"), "re-enrollment not possible yet");
            }
        }
        match connect(&agent).await {
            Ok(conn) => {
                let connected_at = tokio::time::Instant::now();
                agent.conn.send_replace(Some(conn.clone()));
                announce(&format!("grantline-agent connected to {}", agent.config.broker));
                tokio::select! {
                    reason = conn.closed() => {
                        agent.conn.send_replace(None);
                        // Only a connection that lasted starts the backoff
                        // afresh: one the broker closes at once (an identity
                        // it no longer takes) must not be retried at once.
                        if connected_at.elapsed() >= STABLE_CONNECTION {
                            attempt = 0;
                        }
                        match close_reason(&reason) {
                            Some(e) if e.code == ErrorCode::Revoked as i32 => {
                                agent.revoked.store(true, std::sync::atomic::Ordering::SeqCst);
                                tracing::error!(reason = %e.message, "the broker revoked this node; not reconnecting");
                                announce(&format!("grantline-agent revoked: {}", e.message));
                                // Only an admin can undo this: re-enrolling
                                // as another node takes a new join token.
                                return std::future::pending().await;
                            }
                            Some(e) if e.code == ErrorCode::Unauthenticated as i32 => {
                                // This identity no longer speaks for the node
                                // (it was enrolled again elsewhere, or the
                                // broker does not know it): only a new
                                // enrollment helps, so ask for one, slowly.
                                tracing::error!(
                                    reason = %e.message,
                                    "the broker no longer accepts this node's identity; enroll again with a new join token"
                                );
                                announce(&format!("grantline-agent shut out: {}", e.message));
                                attempt = attempt.max(SHUT_OUT_ATTEMPT);
                            }
                            Some(e) => {
                                tracing::warn!(reason = %e, "the broker closed the connection; reconnecting");
                                retry_after = Duration::from_millis(u64::from(e.retry_after_ms));
                                spread = Duration::from_millis(u64::from(e.retry_spread_ms));
                            }
                            None => tracing::warn!(%reason, "connection to the broker lost; reconnecting"),
                        }
                    }
                    () = agent.renewed.notified() => {
                        // Reconnect with the new identity; the old connection
                        // stays up a little for requests already under way.
                        tracing::info!("identity renewed; reconnecting with it");
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(10)).await;
                            conn.close(0u32.into(), b"identity renewed");
                        });
                        continue;
                    }
                }
            }
            Err(e) => {
                let expired = agent.identity.read().map(|i| i.not_after <= now()).unwrap_or(false);
                if let Some(wait) = e.downcast_ref().and_then(refused_retry_after) {
                    tracing::info!(retry_after = ?wait, "the broker is busy (handshake refused); retrying");
                    retry_after = wait;
                } else if expired {
                    tracing::error!("the node identity expired; enroll again with a new join token");
                } else {
                    tracing::warn!(error = %format!("{e:#}"), "cannot connect to the broker");
                }
            }
        }
        let wait = reconnect_wait(attempt, retry_after, spread, jitter_unit());
        attempt = attempt.saturating_add(1);
        // With an expired identity, a join token an admin drops into the
        // token file is acted on within a second, not after the backoff.
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            let expired = agent.identity.read().map(|i| i.not_after <= now()).unwrap_or(false);
            if expired && agent.policy.join_token_file.exists() {
                break;
            }
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + Duration::from_secs(1))).await;
        }
    }
}

async fn connect(agent: &Agent) -> Result<quinn::Connection> {
    let identity = agent.identity.read().map_err(|_| anyhow::anyhow!("identity lock poisoned"))?.clone();
    let cfg = client_for(agent, &identity)?;
    let connecting = agent.endpoint.connect_with(cfg, agent.addr, &agent.config.server_name)?;
    Ok(tokio::time::timeout(Duration::from_secs(10), connecting).await.context("handshake timed out")??)
}

/// The TLS client for `identity`: the one used before while the identity
/// is the same (it holds the broker's session tickets), a new one after a
/// renewal or re-enrollment.
fn client_for(agent: &Agent, identity: &Identity) -> Result<quinn::ClientConfig> {
    let leaf = identity.chain.first().map(|c| c.to_vec()).unwrap_or_default();
    let mut cached = agent.client.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match cached.as_ref() {
        Some((l, cfg)) if *l == leaf => Ok(cfg.clone()),
        _ => {
            let cfg = tls::client_config(&agent.ca_pem, Some(identity))?;
            *cached = Some((leaf, cfg.clone()));
            Ok(cfg)
        }
    }
}

/// A live connection, waiting up to `wait` for one.
async fn connection(agent: &Agent, wait: Duration) -> Option<quinn::Connection> {
    let mut rx = agent.conn.subscribe();
    let conn = match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
        Ok(Ok(guard)) => guard.clone(),
        _ => None,
    };
    conn
}

async fn renew_identity_loop(agent: Arc<Agent>) {
    loop {
        let (nb, na) = {
            let id = agent.identity.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            (id.not_before, id.not_after)
        };
        // An identity is long-lived and may have been loaded from disk after
        // a restart, so its lifetime counts from its not-before.
        let at = renew_at(nb, na, jitter_unit() * 2.0 - 1.0, now());
        let wait = u64::try_from(at - now()).unwrap_or(0);
        tracing::debug!(at, "identity renewal scheduled");
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let mut attempt = 0u32;
        while let Err(e) = renew_once(&agent).await {
            let replaced = agent.identity.read().map(|i| i.not_after != na).unwrap_or(false);
            if replaced {
                // Re-enrollment brought a new identity: schedule its renewal.
                break;
            }
            tracing::warn!(error = %format!("{e:#}"), "identity renewal failed; retrying");
            tokio::time::sleep(backoff(attempt, Duration::from_secs(1), Duration::from_secs(60), jitter_unit())).await;
            attempt = attempt.saturating_add(1);
        }
    }
}

async fn renew_once(agent: &Agent) -> Result<()> {
    if agent.identity.read().map(|i| i.not_after <= now()).unwrap_or(false) {
        bail!("the node identity expired; waiting for re-enrollment");
    }
    let conn = connection(agent, Duration::from_secs(30)).await.context("not connected to the broker")?;
    let (key, csr_der) = key_and_csr(&agent.config.node_name)?;
    let resp =
        call(&conn, &wire::Request { body: Some(Req::RenewIdentity(wire::RenewIdentityRequest { csr_der })) }).await?;
    let renewed = match resp.body {
        Some(Resp::RenewIdentity(r)) => r,
        Some(Resp::Error(e)) => bail!("the broker refused: {e}"),
        _ => bail!("unexpected reply to identity renewal"),
    };
    let id = renewed.identity.context("the broker sent no identity")?;
    let identity = check_identity(&key, &id.chain_der, renewed.receipt.as_ref(), &agent.pinned_key())?;
    AgentState::save_identity(&agent.state_dir, &identity)?;
    let until = identity.not_after;
    *agent.identity.write().map_err(|_| anyhow::anyhow!("identity lock poisoned"))? = identity;
    agent.renewed.notify_one();
    tracing::info!(not_after = until, "node identity renewed");
    announce(&format!("grantline-agent identity renewed until {}", grantline_proto::clock::rfc3339(until)));
    Ok(())
}

/// Connections one uid may hold open on the local socket at once.
pub const MAX_LOCAL_PER_UID: usize = 64;
/// Connections the local socket holds open at once, over all callers.
pub const MAX_LOCAL: usize = 512;
/// Connections held at once by all callers that no `[[allow]]` rule names
/// (they may still ask for the agent's status): however many uids a user
/// commands (subordinate ids, user namespaces), they share this pool.
pub const MAX_LOCAL_UNNAMED: usize = 64;
/// The pool key of callers no rule names.
const UNNAMED: u32 = u32::MAX;

/// Open local connections, by caller uid (callers no rule names under one
/// key): a local user cannot take every file descriptor of the agent, and
/// one caller's connections never starve another's.
fn local_slot(open: &Arc<Slots<u32>>, uid: u32, named: bool) -> Option<Slot<u32>> {
    if named {
        open.take(uid, MAX_LOCAL_PER_UID)
    } else {
        open.take(UNNAMED, MAX_LOCAL_UNNAMED)
    }
}

/// Serves the local socket; never returns. A failing accept (out of file
/// descriptors, memory or buffers) is waited out with backoff: what a caller
/// does to the socket never stops the agent.
async fn serve_socket(agent: Arc<Agent>, listener: UnixListener) -> Result<()> {
    let open = Slots::new(MAX_LOCAL);
    let mut failures = 0u32;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failures = 0;
                stream
            }
            Err(e) => {
                let wait = backoff(failures, Duration::from_millis(20), Duration::from_secs(1), jitter_unit())
                    .max(Duration::from_millis(10));
                tracing::warn!(error = %e, retry_in = ?wait, "cannot accept on the local socket; backing off");
                failures = failures.saturating_add(1);
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let (uid, gid) = stream.peer_cred().map_or((UNNAMED, UNNAMED), |c| (c.uid(), c.gid()));
        let named = agent.policy.may_ask(uid, gid, nix::unistd::getuid().as_raw());
        let Some(slot) = local_slot(&open, uid, named) else {
            refuse_busy(&stream, uid, named);
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let _slot = slot;
            serve_local(agent, stream).await;
        });
    }
}

/// Answers a connection past its caller's limit without waiting for it: the
/// reason is written if the socket takes it at once, what the caller already
/// sent is read and dropped (closing on unread data would reset the
/// connection before the caller reads the answer), and the connection closes.
fn refuse_busy(stream: &UnixStream, uid: u32, named: bool) {
    let who = if named {
        format!("uid {uid} has {MAX_LOCAL_PER_UID} connections open to the agent")
    } else {
        format!("callers that no [[allow]] rule names (uid {uid} among them) have {MAX_LOCAL_UNNAMED} connections open")
    };
    let busy =
        local_error(ErrorCode::Unavailable, format!("{who} (or the agent {MAX_LOCAL} in all); close some and retry"));
    let _ = stream.try_write(&frame::encode(&busy));
    // One read, never a loop: a caller that keeps writing cannot hold the
    // accept loop here.
    let mut sink = [0u8; 4096];
    let _ = stream.try_read(&mut sink);
}

fn local_error(code: ErrorCode, msg: impl Into<String>) -> wire::LocalResponse {
    wire::LocalResponse { body: Some(LocalResp::Error(wire::Error::new(code, msg))) }
}

async fn serve_local(agent: Arc<Agent>, mut stream: UnixStream) {
    let caller = caller_of(&stream);
    let connected = caller.as_ref().and_then(|c| crate::local::process_mark(c.pid));
    let resp = match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut stream)).await {
        Err(_) => local_error(ErrorCode::BadRequest, "no request within 10 s"),
        Ok(Err(e)) => local_error(ErrorCode::BadRequest, format!("cannot read the request: {e}")),
        Ok(Ok(buf)) => match frame::decode::<wire::LocalRequest>(&buf) {
            Err(e) => local_error(ErrorCode::BadRequest, e.to_string()),
            // The process that connected must still be the one it was, running
            // the same executable, once its request is in (RFD 0006: what an
            // exe rule promises).
            Ok(_)
                if caller.is_some()
                    && crate::local::process_mark(caller.as_ref().map_or(0, |c| c.pid)) != connected =>
            {
                local_error(
                    ErrorCode::PermissionDenied,
                    "the calling process exited or ran another executable between connecting and sending its \
                     request; connect and ask from the same process",
                )
            }
            Ok(req) => handle_local(&agent, req, caller).await,
        },
    };
    // A caller that does not read its answer does not hold the connection.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = stream.write_all(&frame::encode(&resp)).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn handle_local(agent: &Agent, req: wire::LocalRequest, caller: Option<wire::Caller>) -> wire::LocalResponse {
    match req.body {
        None => local_error(ErrorCode::BadRequest, "empty request"),
        Some(LocalReq::Status(_)) => {
            let not_after = agent.identity.read().map(|i| i.not_after).unwrap_or(0);
            wire::LocalResponse {
                body: Some(LocalResp::Status(wire::StatusResponse {
                    node_name: agent.config.node_name.clone(),
                    connected: agent.conn.borrow().is_some(),
                    identity_not_after_unix: not_after,
                    broker: agent.config.broker.clone(),
                })),
            }
        }
        Some(LocalReq::Release(r)) => {
            // Releasing revokes a credential, so it takes the same permission
            // as obtaining one: kind secret, the role named in the lease path
            // (database/creds/ROLE/ID).
            // A token accessor names no role: releasing a token takes a rule
            // allowing vault-token for any role.
            let is_token = r.lease_id.starts_with(grantline_proto::audit::event::TOKEN_ACCESSOR_PREFIX);
            let (kind, role) = if is_token {
                (Kind::VaultToken, "*")
            } else {
                (Kind::DynamicSecret, r.lease_id.rsplit('/').nth(1).unwrap_or("*"))
            };
            if let Err(reason) = agent.check_caller(caller.as_ref(), kind, role) {
                return local_error(ErrorCode::PermissionDenied, reason);
            }
            let Some(conn) = connection(agent, Duration::from_secs(5)).await else {
                return wire::LocalResponse { body: Some(LocalResp::Error(CallError::NotConnected.to_wire())) };
            };
            let fingerprint = grantline_proto::audit::event::released_fingerprint(&r.lease_id);
            match call(&conn, &wire::Request { body: Some(Req::Release(r)) }).await {
                Err(e) => wire::LocalResponse { body: Some(LocalResp::Error(e.to_wire())) },
                Ok(wire::Response { body: Some(Resp::Release(rr)) }) => {
                    match receipt::check(rr.receipt.as_ref(), &agent.pinned_key()) {
                        Ok(c) if matches!(&c.event, Event::LeaseRevocation { lease, .. } if *lease == fingerprint) => {
                            agent.follow_key(&c.key);
                            wire::LocalResponse { body: Some(LocalResp::Release(rr)) }
                        }
                        Ok(_) => local_error(ErrorCode::Internal, "the broker's receipt names another lease"),
                        Err(e) => {
                            local_error(ErrorCode::Internal, format!("the broker's receipt does not check out: {e}"))
                        }
                    }
                }
                Ok(wire::Response { body: Some(Resp::Error(e)) }) => {
                    wire::LocalResponse { body: Some(LocalResp::Error(e)) }
                }
                Ok(_) => local_error(ErrorCode::Internal, "unexpected reply from the broker"),
            }
        }
        Some(LocalReq::Grant(mut g)) => {
            let Some(kind) = Kind::from_wire(g.kind) else {
                return local_error(
                    ErrorCode::BadRequest,
                    format!("unknown credential kind {}; use {}", g.kind, Kind::names()),
                );
            };
            if let Err(reason) = agent.check_caller(caller.as_ref(), kind, &g.role) {
                return local_error(ErrorCode::PermissionDenied, reason);
            }
            g.caller = caller;
            match agent.grant(g).await {
                Ok(gr) => wire::LocalResponse { body: Some(LocalResp::Grant(gr)) },
                Err(e) => wire::LocalResponse { body: Some(LocalResp::Error(e)) },
            }
        }
    }
}

impl Agent {
    /// Applies agent.toml's [[allow]] rules to a local caller.
    fn check_caller(&self, caller: Option<&wire::Caller>, kind: Kind, role: &str) -> Result<(), String> {
        let Some(who) = caller else {
            return Err(
                "the calling process could not be identified (it exited, or its pid was reused); try again".into()
            );
        };
        let asking = Caller { uid: who.uid, gid: who.gid, pid: who.pid, exe: who.exe.clone(), unit: who.unit.clone() };
        self.policy.allows(&asking, kind, role, nix::unistd::getuid().as_raw()).map(|_| ()).map_err(|reason| {
            tracing::warn!(uid = who.uid, pid = who.pid, exe = %who.exe, %kind, role, %reason, "local caller refused");
            format!("refused by the agent's policy: {reason}")
        })
    }

    /// Asks the broker for a credential and checks its receipt; an X.509
    /// request without SANs gets the node name.
    pub(crate) async fn grant(&self, mut g: wire::GrantRequest) -> Result<wire::GrantResponse, wire::Error> {
        let is_x509 = Kind::from_wire(g.kind) == Some(Kind::X509);
        if is_x509 && g.sans.is_empty() {
            g.sans = vec![self.config.node_name.clone()];
        }
        if self.revoked.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(wire::Error::new(ErrorCode::Revoked, "this node was revoked by the broker"));
        }
        let Some(conn) = connection(self, Duration::from_secs(5)).await else {
            return Err(CallError::NotConnected.to_wire());
        };
        match call(&conn, &wire::Request { body: Some(Req::Grant(g)) }).await {
            Err(e) => Err(e.to_wire()),
            Ok(wire::Response { body: Some(Resp::Grant(gr)) }) => match check_grant_receipt(self, &gr) {
                Ok(seq) => {
                    tracing::info!(seq, kind = gr.kind, "credential granted");
                    Ok(gr)
                }
                Err(e) => {
                    tracing::error!(error = %e, "the broker's receipt does not check out; credential discarded");
                    Err(wire::Error::new(ErrorCode::Internal, format!("credential discarded: {e}")))
                }
            },
            Ok(wire::Response { body: Some(Resp::Error(e)) }) => Err(e),
            Ok(_) => Err(wire::Error::new(ErrorCode::Internal, "unexpected reply from the broker")),
        }
    }

    /// Gives a lease back (a sink replacing its secret).
    pub(crate) async fn release(&self, lease_id: &str) -> Result<(), wire::Error> {
        let conn = connection(self, Duration::from_secs(5)).await.ok_or_else(|| CallError::NotConnected.to_wire())?;
        let req = wire::Request { body: Some(Req::Release(wire::ReleaseRequest { lease_id: lease_id.into() })) };
        match call(&conn, &req).await {
            Ok(wire::Response { body: Some(Resp::Release(_)) }) => Ok(()),
            Ok(wire::Response { body: Some(Resp::Error(e)) }) => Err(e),
            Ok(_) => Err(wire::Error::new(ErrorCode::Internal, "unexpected reply from the broker")),
            Err(e) => Err(e.to_wire()),
        }
    }

    pub(crate) fn node_name(&self) -> &str {
        &self.config.node_name
    }

    pub(crate) fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub(crate) fn broker(&self) -> &str {
        &self.config.broker
    }

    pub(crate) fn join_token_file(&self) -> &Path {
        &self.policy.join_token_file
    }

    /// Takes a new identity (after re-enrollment) and reconnects with it.
    pub(crate) fn replace_identity(&self, identity: Identity, audit_key: VerifierKey) {
        *self.identity.write().unwrap_or_else(std::sync::PoisonError::into_inner) = identity;
        *self.audit_key.write().unwrap_or_else(std::sync::PoisonError::into_inner) = audit_key;
    }
}

/// Prints a progress line (for the sinks and recovery modules).
pub(crate) fn say(line: &str) {
    announce(line);
}

/// The SHA-256 fingerprint the broker recorded for a granted credential.
pub fn credential_fingerprint(gr: &wire::GrantResponse) -> Result<String> {
    if !gr.lease_id.is_empty() {
        return Ok(vault_fingerprint("lease", &gr.lease_id));
    }
    if !gr.token_accessor.is_empty() {
        return Ok(vault_fingerprint("token-accessor", &gr.token_accessor));
    }
    if !gr.ssh_certificate.is_empty() {
        let cert = ssh_key::Certificate::from_openssh(&gr.ssh_certificate).context("SSH certificate does not parse")?;
        return Ok(hex::encode(Sha256::digest(cert.to_bytes()?)));
    }
    let der = rustls_pemfile::certs(&mut gr.cert_pem.as_bytes()).next().context("no certificate in the reply")??;
    Ok(hex::encode(Sha256::digest(&der)))
}

fn check_grant_receipt(agent: &Agent, gr: &wire::GrantResponse) -> Result<u64> {
    let fp = credential_fingerprint(gr)?;
    let checked = receipt::check_grant(gr.receipt.as_ref(), &agent.pinned_key(), &fp)?;
    agent.follow_key(&checked.key);
    if let Some(r) = &gr.receipt {
        let leaf = grantline_proto::audit::entry::leaf_hash(&r.entry);
        let mut pending = agent.unconfirmed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pending.push(Unconfirmed { seq: checked.seq, leaf, granted: std::time::Instant::now() });
    }
    Ok(checked.seq)
}

/// Confirms that every grant the agent received is in a checkpoint signed by
/// the broker's audit key, with an inclusion proof; reports those that are
/// not within the deadline (a broker that hands out credentials it does not
/// log, or a log that was cut).
async fn confirm_inclusion_loop(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let due: Vec<(u64, grantline_proto::audit::Hash, std::time::Instant)> = {
            let pending = agent.unconfirmed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            pending
                .iter()
                .filter(|u| u.granted.elapsed() >= Duration::from_secs(1))
                .map(|u| (u.seq, u.leaf, u.granted))
                .collect()
        };
        for (seq, leaf, granted) in due {
            // Bounded, so a broker that stopped answering cannot hold the
            // report past the deadline.
            let outcome = match tokio::time::timeout(Duration::from_secs(3), prove_included(&agent, seq, &leaf)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("the broker did not answer the proof request within 3 s")),
            };
            let settled = match &outcome {
                Ok(size) => {
                    announce(&format!("grantline-agent confirmed seq {seq} in checkpoint of size {size}"));
                    true
                }
                Err(e) if granted.elapsed() >= agent.inclusion_deadline => {
                    tracing::error!(seq, error = %format!("{e:#}"), "a grant was not proved included in the audit log in time");
                    announce(&format!("grantline-agent inclusion missing for seq {seq}: {e:#}"));
                    true
                }
                Err(_) => false,
            };
            if settled {
                agent.unconfirmed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|u| u.seq != seq);
            }
        }
    }
}

async fn prove_included(agent: &Agent, seq: u64, leaf: &grantline_proto::audit::Hash) -> Result<u64> {
    let conn = connection(agent, Duration::from_secs(2)).await.context("not connected to the broker")?;
    let resp = call(&conn, &wire::Request { body: Some(Req::Prove(wire::ProveRequest { index: seq })) }).await?;
    let text = match resp.body {
        Some(Resp::Prove(p)) => p.tlog_proof,
        Some(Resp::Error(e)) => bail!("the broker did not prove it: {e}"),
        _ => bail!("unexpected reply to a proof request"),
    };
    let proof = grantline_proto::audit::checkpoint::InclusionReceipt::parse(&text)?;
    if proof.index != seq {
        bail!("the broker proved entry {} instead of {seq}", proof.index);
    }
    Ok(proof.verify(leaf, &[agent.pinned_key()])?.size)
}

impl Agent {
    fn pinned_key(&self) -> VerifierKey {
        self.audit_key.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Pins the key a verified receipt was signed by, after a rotation the
    /// receipt proved from the previously pinned key.
    fn follow_key(&self, key: &VerifierKey) {
        let mut pinned = self.audit_key.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *pinned == *key {
            return;
        }
        match grantline_proto::files::write_atomic(
            &self.state_dir.join("audit.vkey"),
            format!("{key}\n").as_bytes(),
            0o644,
        ) {
            Ok(()) => {
                tracing::info!(old = %*pinned, new = %key, "the broker rotated its audit key; following it");
                *pinned = key.clone();
            }
            Err(e) => tracing::error!(error = %e, "cannot save the broker's new audit key"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_waits_honour_the_broker() {
        let (s, ms) = (Duration::from_secs, Duration::from_millis);
        // Nothing asked for: the backoff alone.
        assert_eq!(reconnect_wait(0, Duration::ZERO, Duration::ZERO, 0.5), ms(100));
        assert_eq!(reconnect_wait(10, Duration::ZERO, Duration::ZERO, 0.5), s(15));
        // A retry-after: at least that, plus up to as much again (or the backoff).
        assert_eq!(reconnect_wait(0, s(1), Duration::ZERO, 0.0), s(1));
        assert_eq!(reconnect_wait(0, s(1), Duration::ZERO, 0.5), ms(1500));
        assert_eq!(reconnect_wait(10, s(1), Duration::ZERO, 0.5), s(16));
        // A spread: the retry-after plus a uniform share of it, whatever the attempt.
        assert_eq!(reconnect_wait(0, s(1), s(50), 0.0), s(1));
        assert_eq!(reconnect_wait(0, s(1), s(50), 0.5), s(26));
        assert_eq!(reconnect_wait(7, s(1), s(50), 1.0), s(51));
        assert_eq!(reconnect_wait(0, s(1), s(50), 7.0), s(51), "the unit is clamped");
        // Whatever the close reason says, at most ten minutes each.
        let forever = Duration::from_millis(u64::from(u32::MAX));
        assert_eq!(reconnect_wait(0, forever, forever, 1.0), s(1200));
        assert_eq!(reconnect_wait(0, forever, Duration::ZERO, 1.0), s(1200));
    }

    #[test]
    fn only_connection_refused_is_a_refusal() {
        let close = |code| {
            quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: code,
                frame_type: None,
                reason: Default::default(),
            })
        };
        assert_eq!(
            refused_retry_after(&close(quinn::TransportErrorCode::CONNECTION_REFUSED)),
            Some(grantline_proto::REFUSED_RETRY_AFTER)
        );
        assert_eq!(refused_retry_after(&close(quinn::TransportErrorCode::PROTOCOL_VIOLATION)), None);
        assert_eq!(refused_retry_after(&quinn::ConnectionError::TimedOut), None);
    }
}
