//! Node revocation: the node is marked revoked (durably, then in memory), its
//! live connections are closed with `REVOKED`, the revocation is audited, and
//! its Vault leases and tokens are revoked, each audited too.

use grantline_proto::admin as api;
use grantline_proto::audit::event::CallerInfo;
use grantline_proto::audit::{Entry, Event};
use grantline_proto::wire::{self, ErrorCode};
use tonic::Status;

use super::handler::{now_unix, revoke_lease};
use super::identity::check_node_name;
use super::Shared;

/// Closes a connection telling the agent why, as an encoded `wire::Error` in
/// the QUIC application close reason.
pub(crate) fn close_with(conn: &quinn::Connection, error: &wire::Error) {
    let reason = prost::Message::encode_to_vec(error);
    let code = u32::try_from(error.code).unwrap_or(0);
    conn.close(code.into(), &reason);
}

pub(crate) async fn revoke_node(
    shared: &Shared,
    name: &str,
    reason: &str,
    admin: CallerInfo,
) -> Result<api::RevokeNodeResponse, Status> {
    check_node_name(name).map_err(Status::invalid_argument)?;
    let serial = {
        let nodes = shared.nodes.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        match nodes.get(name) {
            None => return Err(Status::not_found(format!("node {name} is not enrolled; see 'grantline nodes list'"))),
            Some(n) if n.revoked => {
                return Err(Status::failed_precondition(format!(
                    "node {name} was already revoked at {}",
                    grantline_proto::clock::rfc3339(n.revoked_at)
                )))
            }
            Some(n) => n.serial.clone(),
        }
    };
    let now = now_unix();
    match shared.state.revoke_node(name, now) {
        Ok(true) => {}
        Ok(false) => return Err(Status::failed_precondition(format!("node {name} was revoked meanwhile"))),
        Err(e) => return Err(Status::unavailable(format!("cannot record the revocation: {e:#}"))),
    }
    if let Some(n) = shared.nodes.write().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(name) {
        n.revoked = true;
        n.revoked_at = now;
    }
    // After the flag is set: a connection registering from now on sees it
    // and closes itself (see `serve_connection`).
    let conns = shared.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(name).unwrap_or_default();
    let was_connected = !conns.is_empty();
    let error = wire::Error::new(ErrorCode::Revoked, format!("node {name} was revoked: {reason}"));
    for conn in conns.values() {
        close_with(conn, &error);
    }
    metrics::counter!("grantline_nodes_revoked_total").increment(1);
    tracing::warn!(node = %name, %reason, uid = admin.uid, was_connected, "node revoked");
    let event = Event::NodeRevocation { node: name.into(), serial, reason: reason.into(), admin };
    let receipt = shared.audit.append(event).await.map_err(|e| {
        Status::unavailable(format!(
            "node {name} is revoked and disconnected, but the revocation could not be audited ({e}); its leases were not revoked yet, run the revocation again when the audit log is back"
        ))
    })?;
    let audit_seq = Entry::decode(&receipt.entry).map(|e| e.seq).unwrap_or(0);
    let mut leases_revoked = 0u32;
    let mut leases_failed = Vec::new();
    if let Some(vault) = &shared.vault {
        let leases = shared.state.live_leases(name, now).map_err(|e| Status::unavailable(format!("{e:#}")))?;
        for lease in leases {
            match revoke_lease(shared, vault, &lease, "node revoked").await {
                Ok(_) => leases_revoked += 1,
                Err(reply) => {
                    tracing::error!(node = %name, lease = %lease.fingerprint, ?reply, "cannot revoke a lease of a revoked node");
                    leases_failed.push(lease.fingerprint);
                }
            }
        }
    }
    Ok(api::RevokeNodeResponse { audit_seq, was_connected, leases_revoked, leases_failed })
}
