//! The local socket workloads call: bounded per uid and in all, each caller
//! identified by SO_PEERCRED and checked against agent.toml's `[[allow]]`
//! rules before the broker sees the request.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grantline_proto::audit::Event;
use grantline_proto::kind::Kind;
use grantline_proto::slots::{Slot, Slots};
use grantline_proto::wire::{self, local_request::Body as LocalReq, local_response::Body as LocalResp};
use grantline_proto::wire::{request::Body as Req, response::Body as Resp};
use grantline_proto::{frame, wire::ErrorCode};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use crate::broker::{call, CallError};
use crate::config::Caller;
use crate::connection::{connection, jitter_unit};
use crate::local::{attest, read_frame};
use crate::renew::backoff;
use crate::session::Agent;

pub(crate) fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener> {
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
pub(crate) async fn serve_socket(agent: Arc<Agent>, listener: UnixListener) -> Result<()> {
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
    let (caller, connected) = match attest(&stream).await {
        Some((caller, mark)) => (Some(caller), Some(mark)),
        None => (None, None),
    };
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
                    match agent.trust().check(rr.receipt.as_ref()) {
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
                // Refused here, before the broker sees it (which would have
                // audited it as a bad request): logged, so probes show.
                tracing::warn!(
                    uid = caller.as_ref().map(|c| c.uid),
                    kind = g.kind,
                    "local request for an unknown credential kind refused"
                );
                return local_error(
                    ErrorCode::BadRequest,
                    format!("unknown credential kind {}; use {}", g.kind, Kind::names()),
                );
            };
            // SVIDs are the SPIFFE socket's, where each principal's asks are
            // budgeted and answers cached (RFD 0011); here they would not be.
            if kind.is_svid() {
                return local_error(
                    ErrorCode::BadRequest,
                    format!("{kind} is served on the agent's SPIFFE socket (the Workload API), not this one"),
                );
            }
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
    pub(crate) fn check_caller(&self, caller: Option<&wire::Caller>, kind: Kind, role: &str) -> Result<(), String> {
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
}
