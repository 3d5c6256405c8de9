//! Node revocation: the node is marked revoked (durably, then in memory), its
//! live connections are closed with `REVOKED`, the revocation is audited, and
//! its Vault leases and tokens are revoked, each audited too.

use grantline_proto::admin as api;
use grantline_proto::audit::event::{CallerInfo, TOKEN_ACCESSOR_PREFIX};
use grantline_proto::audit::{Entry, Event};
use grantline_proto::wire::{self, ErrorCode};
use tonic::Status;

use super::identity::check_node_name;
use super::shared::Shared;
use crate::state::LeaseRecord;
use crate::vault::Vault;
use grantline_proto::clock::now_unix;

pub(crate) use super::closing::close_with;

pub(crate) async fn revoke_node(
    shared: &Shared,
    name: &str,
    reason: &str,
    admin: CallerInfo,
) -> Result<api::RevokeNodeResponse, Status> {
    check_node_name(name).map_err(Status::invalid_argument)?;
    let serial = shared.registry.with(name, |known| match known {
        None => Err(Status::not_found(format!("node {name} is not enrolled; see 'grantline nodes list'"))),
        Some(n) if n.revoked => Err(Status::failed_precondition(format!(
            "node {name} was already revoked at {}",
            grantline_proto::clock::rfc3339(n.revoked_at)
        ))),
        Some(n) => Ok(n.serial.clone()),
    })?;
    let now = now_unix();
    match shared.state.revoke_node(name, now).await {
        Ok(true) => {}
        Ok(false) => return Err(Status::failed_precondition(format!("node {name} was revoked meanwhile"))),
        Err(e) => return Err(Status::unavailable(format!("cannot record the revocation: {e:#}"))),
    }
    // The flag is set before the live connections are taken: a connection
    // registering from now on sees it and closes itself (see `quic`).
    let conns = shared.registry.revoke(name, now);
    let was_connected = !conns.is_empty();
    let error = wire::Error::new(ErrorCode::Revoked, format!("node {name} was revoked: {reason}"));
    for conn in &conns {
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
        let leases = shared.state.live_leases(name, now).await.map_err(|e| Status::unavailable(format!("{e:#}")))?;
        for lease in leases {
            match revoke_lease(shared, vault, &lease, "node revoked").await {
                Ok(_) => leases_revoked += 1,
                Err(error) => {
                    tracing::error!(node = %name, lease = %lease.fingerprint, %error, "cannot revoke a lease of a revoked node");
                    leases_failed.push(lease.fingerprint);
                }
            }
        }
    }
    Ok(api::RevokeNodeResponse { audit_seq, was_connected, leases_revoked, leases_failed })
}

/// Revokes one lease in Vault, marks it, and audits the revocation; an
/// error says what failed (the caller answers UNAVAILABLE).
pub(crate) async fn revoke_lease(
    shared: &Shared,
    vault: &Vault,
    lease: &LeaseRecord,
    reason: &str,
) -> Result<wire::Receipt, String> {
    let revoked = match lease.lease_id.strip_prefix(TOKEN_ACCESSOR_PREFIX) {
        Some(accessor) => vault.revoke_accessor(accessor).await,
        None => vault.revoke_lease(&lease.lease_id).await,
    };
    if let Err(e) = revoked {
        return Err(format!("Vault did not revoke the lease: {e}"));
    }
    if let Err(e) = shared.state.mark_lease_revoked(&lease.lease_id, now_unix()).await {
        tracing::error!(error = %e, "lease revoked in Vault but not marked in state.db");
    }
    let event =
        Event::LeaseRevocation { node: lease.node.clone(), lease: lease.fingerprint.clone(), reason: reason.into() };
    shared.audit.append(event).await.map_err(|e| e.to_string())
}
