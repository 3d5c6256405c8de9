//! The admin control plane: gRPC (tonic) on a Unix socket, RFD 0006.
//!
//! Every call is authorized from the kernel's view of the caller
//! (SO_PEERCRED): root, the broker's own user, or a member of the admin
//! group. State changes and reads of the audit log are audited, and fail
//! closed when the audit log cannot take the entry.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grantline_proto::admin::admin_server::{Admin, AdminServer};
use grantline_proto::admin::{self as api};
use grantline_proto::audit::event::{excerpt, CallerInfo};
use grantline_proto::audit::{Entry, Event};
use tokio::net::UnixListener;

use super::admin_peer::{AdminPeer, AdminStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::identity::check_node_name;
use super::options::AdminOptions;
use super::shared::Shared;
use crate::audit::inventory::GrantFilter;
use crate::audit::prove::{prove, Which};
use grantline_proto::clock::now_unix;

/// Binds the admin socket: a stale socket is replaced, a live one refused.
pub fn bind(opts: &AdminOptions) -> Result<(UnixListener, Option<u32>)> {
    let path = &opts.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another broker is serving the admin socket {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let gid = match &opts.group {
        Some(name) => match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Some(g.gid.as_raw()),
            Ok(None) => {
                tracing::warn!(group = %name, "admin group does not exist; only root and the broker's user may administer");
                None
            }
            Err(e) => bail!("cannot look up admin group {name}: {e}"),
        },
        None => None,
    };
    let std_listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(opts.mode))?;
    if let Some(gid) = gid {
        // Best effort: a broker that is not root cannot give the socket away.
        if let Err(e) = nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))) {
            tracing::warn!(error = %e, "cannot give the admin socket to the admin group");
        }
    }
    std_listener.set_nonblocking(true)?;
    Ok((UnixListener::from_std(std_listener)?, gid))
}

/// Serves the admin API on `listener` until `shutdown` resolves.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: UnixListener,
    admin_gid: Option<u32>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let service = AdminService { shared, admin_gid };
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::UnixListenerStream::new(listener), |conn| {
        conn.map(AdminStream::new)
    });
    if let Err(e) = tonic::transport::Server::builder()
        .add_service(AdminServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
    {
        tracing::error!(error = %e, "admin API stopped");
    }
}

struct AdminService {
    shared: Arc<Shared>,
    admin_gid: Option<u32>,
}

impl AdminService {
    fn authorize<T>(&self, req: &Request<T>) -> Result<CallerInfo, Status> {
        let peer = req.extensions().get::<AdminPeer>();
        let cred = peer
            .and_then(|p| p.uds.peer_cred)
            .ok_or_else(|| Status::permission_denied("the admin API answers only local callers on its Unix socket"))?;
        let groups = peer.map(|p| &*p.groups).unwrap_or_default();
        let pid = cred.pid().unwrap_or(0);
        let (uid, gid) = (cred.uid(), cred.gid());
        let admin_group = |g: u32| self.admin_gid == Some(g);
        let allowed = uid == 0
            || uid == nix::unistd::geteuid().as_raw()
            || admin_group(gid)
            || groups.iter().copied().any(admin_group);
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map(|p| p.display().to_string()).unwrap_or_default();
        let caller = CallerInfo { uid, gid, pid: u32::try_from(pid).unwrap_or(0), exe, unit: String::new() };
        if !allowed {
            tracing::warn!(uid, gid, pid, "admin API call refused");
            return Err(Status::permission_denied(format!(
                "uid {uid} may not use the admin API: run it as root or as a member of the {} group",
                self.admin_gid.map_or_else(|| "admin".to_owned(), |g| format!("gid {g}"))
            )));
        }
        Ok(caller)
    }

    async fn audit(&self, event: Event) -> Result<u64, Status> {
        let receipt =
            self.shared.audit.append(event).await.map_err(|e| Status::unavailable(format!("not audited: {e}")))?;
        Ok(Entry::decode(&receipt.entry).map(|e| e.seq).unwrap_or(0))
    }

    async fn read_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::audit::AuditStore) -> Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let reader = self.shared.audit_reader.clone();
        tokio::task::spawn_blocking(move || reader.with(f))
            .await
            .map_err(|e| Status::internal(format!("audit read failed: {e}")))?
            .map_err(|e| Status::unavailable(format!("{e:#}")))
    }
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), Status> {
    if labels.len() > 32 {
        return Err(Status::invalid_argument("at most 32 labels per node"));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        let value_ok = v.len() <= 256 && !v.chars().any(char::is_control);
        if !key_ok || !value_ok {
            return Err(Status::invalid_argument(format!(
                "label {:?}={:?} is not valid: keys are 1-63 letters, digits, '-', '_', '.', '/'; values up to 256 printable characters",
                excerpt(k, 80),
                excerpt(v, 80)
            )));
        }
    }
    Ok(())
}

type TailStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<api::AuditEntry, Status>> + Send>>;

/// The most entries one tail read fetches from SQLite at a time.
const TAIL_BATCH: usize = 512;

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_join_token(
        &self,
        req: Request<api::CreateJoinTokenRequest>,
    ) -> Result<Response<api::CreateJoinTokenResponse>, Status> {
        let admin = self.authorize(&req)?;
        let r = req.into_inner();
        if !r.node_name.is_empty() {
            check_node_name(&r.node_name).map_err(Status::invalid_argument)?;
        }
        let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
        check_labels(&labels)?;
        let ttl = match r.ttl_seconds {
            0 => Duration::from_secs(3600),
            s if s > 7 * 24 * 3600 => return Err(Status::invalid_argument("a join token lives at most 7 days")),
            s => Duration::from_secs(u64::from(s)),
        };
        let node = (!r.node_name.is_empty()).then_some(r.node_name.as_str());
        // Fail closed: a token whose creation is not in the log is never handed out.
        let token = self.shared.issue_join_token(node, labels, ttl, admin).await.map_err(Status::unavailable)?;
        Ok(Response::new(api::CreateJoinTokenResponse {
            token: token.token,
            token_id: token.id,
            expires_at_unix: token.expires_at,
        }))
    }

    async fn list_nodes(
        &self,
        req: Request<api::ListNodesRequest>,
    ) -> Result<Response<api::ListNodesResponse>, Status> {
        self.authorize(&req)?;
        let mut listed = self.shared.registry.list();
        // In a fleet, where each node is connected (and when any broker
        // last saw it) is in the shared store.
        let mut presence: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
        if let Some(fleet) = &self.shared.fleet {
            let unavailable = |e: anyhow::Error| Status::unavailable(format!("cannot read the fleet's state: {e:#}"));
            let stored = self.shared.state.nodes().await.map_err(unavailable)?;
            let seen: std::collections::HashMap<String, i64> =
                stored.into_iter().map(|n| (n.name, n.last_seen)).collect();
            for l in &mut listed {
                l.record.last_seen = l.record.last_seen.max(seen.get(&l.record.name).copied().unwrap_or(0));
            }
            for (node, broker) in crate::state::StateStore::presence(&fleet.store).await.map_err(unavailable)? {
                presence.entry(node).or_default().push(broker);
            }
        }
        let nodes = listed
            .into_iter()
            .map(|l| (presence.remove(&l.record.name).unwrap_or_default(), l))
            .map(|(connected_to, l)| api::Node {
                connected: l.connected || !connected_to.is_empty(),
                connected_to,
                last_seen_unix: l.record.last_seen,
                identity_not_after_unix: l.record.not_after,
                revoked: l.record.revoked,
                revoked_at_unix: l.record.revoked_at,
                identity_serial: l.record.serial,
                labels: l.record.labels.into_iter().collect(),
                name: l.record.name,
            })
            .collect();
        Ok(Response::new(api::ListNodesResponse { nodes }))
    }

    async fn revoke_node(
        &self,
        req: Request<api::RevokeNodeRequest>,
    ) -> Result<Response<api::RevokeNodeResponse>, Status> {
        let admin = self.authorize(&req)?;
        let r = req.into_inner();
        let reason = if r.reason.trim().is_empty() { "revoked by an admin".to_owned() } else { r.reason };
        if reason.len() > 512 {
            return Err(Status::invalid_argument("the reason is longer than 512 bytes"));
        }
        let outcome = super::revoke::revoke_node(&self.shared, &r.node_name, &reason, admin).await?;
        Ok(Response::new(outcome))
    }

    async fn list_grants(
        &self,
        req: Request<api::ListGrantsRequest>,
    ) -> Result<Response<api::ListGrantsResponse>, Status> {
        let admin = self.authorize(&req)?;
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 1000,
            n => usize::try_from(n).unwrap_or(usize::MAX).min(100_000),
        };
        self.audit(Event::AuditRead { what: "credential inventory".into(), admin }).await?;
        let filter = GrantFilter {
            node: (!r.node_name.is_empty()).then_some(r.node_name),
            kind: (!r.kind.is_empty()).then_some(r.kind),
            all: r.include_expired,
            limit,
        };
        let rows = self.read_store(move |s| Ok(s.grants(&filter, now_unix())?)).await?;
        let grants = rows
            .into_iter()
            .map(|g| api::Grant {
                audit_seq: g.seq,
                node_name: g.node,
                kind: g.kind,
                role: g.role,
                serial: g.serial,
                fingerprint: g.fingerprint,
                names: g.names,
                granted_at_unix: g.granted_ms / 1000,
                not_after_unix: g.not_after,
                revoked_at_unix: g.revoked_ms.map_or(0, |ms| ms / 1000),
                caller_uid: g.caller.as_ref().map_or(0, |c| c.uid),
                caller_exe: g.caller.as_ref().map(|c| c.exe.clone()).unwrap_or_default(),
                caller_unit: g.caller.map(|c| c.unit).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(api::ListGrantsResponse { grants }))
    }

    type TailAuditStream = TailStream;

    async fn tail_audit(&self, req: Request<api::TailAuditRequest>) -> Result<Response<TailStream>, Status> {
        let admin = self.authorize(&req)?;
        let r = req.into_inner();
        let mut size = self.shared.audit.size();
        let now = *size.borrow();
        let start = match (r.from_seq, r.last) {
            (Some(seq), _) => seq,
            (None, 0) => now,
            (None, n) => now.saturating_sub(u64::from(n)),
        };
        let what = format!("tail from seq {start}{}", if r.follow { ", following" } else { "" });
        self.audit(Event::AuditRead { what, admin }).await?;
        let reader = self.shared.audit_reader.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(TAIL_BATCH);
        tokio::spawn(async move {
            let mut next = start;
            // Without follow, the tail ends where the log stood when asked.
            let stop = if r.follow { u64::MAX } else { now };
            loop {
                let end = (*size.borrow_and_update()).min(stop);
                while next < end {
                    let reader = reader.clone();
                    let batch =
                        tokio::task::spawn_blocking(move || reader.with(|s| s.stored_range(next, end, TAIL_BATCH)))
                            .await;
                    let rows = match batch {
                        Ok(Ok(rows)) if !rows.is_empty() => rows,
                        Ok(Ok(_)) => break,
                        Ok(Err(e)) => {
                            let _ = tx.send(Err(Status::unavailable(format!("cannot read the audit log: {e}")))).await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(Status::internal(format!("audit read failed: {e}")))).await;
                            return;
                        }
                    };
                    for row in rows {
                        next = u64::try_from(row.seq).unwrap_or(u64::MAX).saturating_add(1);
                        if tx.send(Ok(audit_entry(row))).await.is_err() {
                            return;
                        }
                    }
                }
                if !r.follow && next >= stop {
                    return;
                }
                tokio::select! {
                    changed = size.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_checkpoint(
        &self,
        req: Request<api::GetCheckpointRequest>,
    ) -> Result<Response<api::GetCheckpointResponse>, Status> {
        self.authorize(&req)?;
        let note = self
            .shared
            .audit
            .checkpoints()
            .borrow()
            .clone()
            .ok_or_else(|| Status::unavailable("no checkpoint has been signed yet; retry in a second"))?;
        let size = grantline_proto::audit::note::body(&note)
            .and_then(|b| grantline_proto::audit::checkpoint::Checkpoint::parse_body(b).ok())
            .map_or(0, |c| c.size);
        Ok(Response::new(api::GetCheckpointResponse {
            checkpoint_note: note,
            size,
            verifier_key: self.shared.vkey.to_string(),
        }))
    }

    async fn prove(&self, req: Request<api::ProveRequest>) -> Result<Response<api::ProveResponse>, Status> {
        let admin = self.authorize(&req)?;
        let which = match req.into_inner().what {
            Some(api::prove_request::What::Index(i)) => Which::Inclusion(i),
            Some(api::prove_request::What::OldSize(s)) => Which::Consistency(s),
            None => return Err(Status::invalid_argument("set index or old_size")),
        };
        let note = self
            .shared
            .audit
            .checkpoints()
            .borrow()
            .clone()
            .ok_or_else(|| Status::unavailable("no checkpoint has been signed yet; retry in a second"))?;
        self.audit(Event::AuditRead { what: format!("{which:?} proof"), admin }).await?;
        let (proof, size) = self
            .read_store(move |s| prove(s, &note, which))
            .await
            .map_err(|s| Status::invalid_argument(s.message().to_owned()))?;
        Ok(Response::new(api::ProveResponse { proof, size }))
    }

    async fn reload_policy(
        &self,
        req: Request<api::ReloadPolicyRequest>,
    ) -> Result<Response<api::ReloadPolicyResponse>, Status> {
        let admin = self.authorize(&req)?;
        match self.shared.reload_policy(Some(admin)).await {
            Ok(r) => Ok(Response::new(r)),
            // The error may quote the file: cut it to what a gRPC status carries.
            Err(super::reload::ReloadError::Invalid(e)) => Err(Status::invalid_argument(excerpt(&e, 4096))),
            Err(super::reload::ReloadError::NotAudited(e)) => Err(Status::unavailable(excerpt(&e, 4096))),
        }
    }
}

fn audit_entry(row: grantline_proto::audit::StoredEntry) -> api::AuditEntry {
    let decoded = Entry::decode(&row.entry).ok();
    let event = decoded.as_ref().and_then(|e| e.event().ok());
    api::AuditEntry {
        seq: u64::try_from(row.seq).unwrap_or(0),
        time_unix_ms: decoded.as_ref().map_or(0, |e| e.time_ms),
        event_type: event.as_ref().map_or("malformed", |e| e.type_name()).to_owned(),
        event_json: event.and_then(|e| serde_json::to_string(&e).ok()).unwrap_or_default(),
        entry: row.entry,
        signature: row.signature,
    }
}
