//! Request handling: enrollment, identity renewal and grants. Each path ends
//! the same way: nothing leaves the broker before its audit entry is durable.

use grantline_proto::audit::Event;
use grantline_proto::wire::{self, request::Body as Req, response::Body as Resp, ErrorCode};

use super::identity::{check_node_name, issue_identity, refused, IssuedIdentity, PeerNode};
use super::revoke::revoke_lease;
use super::shared::Shared;
use crate::grant::GrantError;
use crate::issuer::{check_csr, CheckedCsr};
use crate::policy::{Kind, NodeAttrs};
use crate::state::{NodeRecord, Replace, TokenError, Upsert};

type Reply = wire::Response;

use grantline_proto::clock::now_unix;

fn err(code: ErrorCode, msg: impl Into<String>) -> Reply {
    Reply { body: Some(Resp::Error(wire::Error::new(code, msg))) }
}

pub(crate) async fn handle(shared: &Shared, peer: Option<&PeerNode>, req: wire::Request) -> Reply {
    match req.body {
        None => err(ErrorCode::BadRequest, "empty request: set one of enroll, renew_identity, grant, release, prove"),
        Some(Req::Enroll(r)) => enroll(shared, r).await,
        Some(Req::RenewIdentity(r)) => match (authenticate(shared, peer), peer) {
            (Ok(node), Some(peer)) => renew_identity(shared, &node, &peer.serial, r).await,
            (Ok(_), None) => err(ErrorCode::Unauthenticated, "identity renewal needs a node identity certificate"),
            (Err(reply), _) => reply,
        },
        Some(Req::Grant(r)) => {
            let kind = Kind::name_of_wire(r.kind);
            let reply = match authenticate(shared, peer) {
                Ok(node) => grant(shared, &node, r).await,
                Err(reply) => reply,
            };
            let outcome = match &reply.body {
                Some(Resp::Grant(_)) => "granted",
                Some(Resp::Error(e)) if e.code == ErrorCode::PermissionDenied as i32 => "denied",
                _ => "error",
            };
            metrics::counter!("grantline_grants_total", "kind" => kind, "outcome" => outcome).increment(1);
            reply
        }
        Some(Req::Release(r)) => match authenticate(shared, peer) {
            Ok(node) => release(shared, &node, r).await,
            Err(reply) => reply,
        },
        Some(Req::Prove(r)) => match authenticate(shared, peer) {
            Ok(_) => prove(shared, r.index).await,
            Err(reply) => reply,
        },
    }
}

/// The node behind the connection: certificate verified by rustls, enrolled,
/// not revoked, and not expired since the handshake.
// The error is the reply itself, built once per refused request.
#[allow(clippy::result_large_err)]
fn authenticate(shared: &Shared, peer: Option<&PeerNode>) -> Result<NodeAttrs, Reply> {
    let Some(peer) = peer else {
        return Err(err(
            ErrorCode::Unauthenticated,
            "this request needs a node identity certificate; enroll first with 'grantline-agent enroll'",
        ));
    };
    if peer.not_after <= now_unix() {
        return Err(err(
            ErrorCode::Unauthenticated,
            format!("node identity of {} expired; reconnect with a renewed identity or enroll again", peer.name),
        ));
    }
    shared
        .registry
        .speaker(&peer.name, &peer.serial, |n| NodeAttrs { name: n.name.clone(), labels: n.labels.clone() })
        .map_err(|why| Reply { body: Some(Resp::Error(refused(&why, &peer.name, &peer.serial))) })
}

async fn audit_denial(shared: &Shared, event: Event) {
    if let Err(e) = shared.audit.append(event).await {
        tracing::error!(error = %e, "could not audit a denial");
    }
}

async fn enroll(shared: &Shared, r: wire::EnrollRequest) -> Reply {
    let csr = match check_csr(&r.csr_der) {
        Ok(c) => c,
        Err(e) => return err(ErrorCode::BadRequest, e),
    };
    if !r.node_name.is_empty() {
        if let Err(e) = check_node_name(&r.node_name) {
            return err(ErrorCode::BadRequest, e);
        }
    }
    let deny = |reason: String, node: &str| Event::Denial {
        action: "enroll".into(),
        node: node.into(),
        kind: String::new(),
        role: String::new(),
        policy: String::new(),
        reason,
        caller: None,
    };
    // The token is spent only once the request may use it: a name it does
    // not pin must be free (an unpinned token never takes over an enrolled
    // node; re-enrolling a node takes a token pinned to it), and a revoked
    // node stays out.
    let accept = |t: &crate::state::Redeemed| {
        let name = t.node.as_deref().unwrap_or(&r.node_name);
        if name.is_empty() {
            return Err(TokenError::Refused(
                "the token pins no node name, so the request must give one (--name)".into(),
            ));
        }
        shared.registry.with(name, |known| match known {
            Some(n) if n.revoked => Err(TokenError::NodeRevoked(name.to_owned())),
            Some(_) if t.node.is_none() => Err(TokenError::Refused(format!(
                "node {name} is already enrolled; to re-enroll it, use a token pinned to it \
                 ('grantline token create --node {name}')"
            ))),
            _ => Ok(()),
        })
    };
    let redeemed = match shared.state.redeem_token(&r.token, &r.node_name, now_unix(), Box::new(accept)).await {
        Ok(t) => t,
        Err(e) => {
            audit_denial(shared, deny(e.to_string(), &r.node_name)).await;
            let code = match &e {
                TokenError::Store(_) => ErrorCode::Unavailable,
                TokenError::NodeRevoked(_) => ErrorCode::Revoked,
                TokenError::Refused(_) => ErrorCode::BadRequest,
                _ => ErrorCode::InvalidToken,
            };
            return err(code, e.to_string());
        }
    };
    let name = redeemed.node.clone().unwrap_or_else(|| r.node_name.clone());
    let node = NodeAttrs { name, labels: redeemed.labels };
    let event = |id: &IssuedIdentity| Event::Enrollment {
        node: node.name.clone(),
        labels: node.labels.clone(),
        token_id: redeemed.id.clone(),
        serial: id.serial.clone(),
        fingerprint: id.fingerprint.clone(),
        not_after: id.not_after,
    };
    let generation = Generation::Enrollment { pinned: redeemed.node.is_some() };
    match grant_identity(shared, &node, &csr, generation, event).await {
        Ok((identity, receipt)) => {
            tracing::info!(node = %node.name, token = %redeemed.id, "node enrolled");
            Reply {
                body: Some(Resp::Enroll(wire::EnrollResponse {
                    identity: Some(identity),
                    receipt: Some(receipt),
                    audit_vkey: shared.vkey.to_string(),
                    fleet_vkey: shared.fleet_vkey.as_ref().map(ToString::to_string).unwrap_or_default(),
                })),
            }
        }
        Err(reply) => reply,
    }
}

/// What an identity replaces: at enrollment every earlier identity of the
/// name; at renewal the renewing one (by serial), which stays usable until
/// the agent reconnects with the new one.
#[derive(Clone, PartialEq, Eq)]
enum Generation {
    /// With a token pinned to the name (it may replace the node's identity)
    /// or not (the name must be new).
    Enrollment {
        pinned: bool,
    },
    Renewal {
        from: String,
    },
}

impl Generation {
    /// What the store may replace, checked again there (across a fleet).
    fn replace(&self) -> Replace<'_> {
        match self {
            Generation::Enrollment { pinned: true } => Replace::Any,
            Generation::Enrollment { pinned: false } => Replace::Nothing,
            Generation::Renewal { from } => Replace::From(from),
        }
    }
}

/// Issues a node identity for `node`, audits it with `event`, records the
/// node, and returns what goes on the wire. Revocation wins every race: a
/// node revoked while its identity was being issued keeps its revocation and
/// gets no identity; so does a renewal whose identity a re-enrollment
/// replaced meanwhile.
#[allow(clippy::result_large_err)]
async fn grant_identity(
    shared: &Shared,
    node: &NodeAttrs,
    csr: &CheckedCsr,
    generation: Generation,
    event: impl FnOnce(&IssuedIdentity) -> Event,
) -> Result<(wire::NodeIdentity, wire::Receipt), Reply> {
    let id =
        issue_identity(&shared.pki, &node.name, csr, shared.identity_ttl).map_err(|e| err(ErrorCode::BadRequest, e))?;
    let receipt = shared.audit.append(event(&id)).await.map_err(|e| err(ErrorCode::Unavailable, e.to_string()))?;
    let revoked = || err(ErrorCode::Revoked, format!("node {} has been revoked", node.name));
    let _commit = shared.identity_commit.lock().await;
    let previous_serial = shared.registry.with(&node.name, |known| {
        if known.is_some_and(|n| n.revoked) {
            return Err(revoked());
        }
        match (&generation, known) {
            (Generation::Enrollment { .. }, _) => Ok(String::new()),
            // The previous identity renews only while the current one has not
            // been used: a leaked old identity cannot take the node over.
            (Generation::Renewal { from }, Some(n)) if n.serial == *from => Ok(from.clone()),
            (Generation::Renewal { from }, Some(n)) if n.previous_serial == *from && !n.current_seen => {
                Ok(from.clone())
            }
            (Generation::Renewal { .. }, _) => Err(err(
                ErrorCode::Unauthenticated,
                format!(
                    "the identity renewing node {} is no longer one of its own (it was replaced by a renewal \
                     or a re-enrollment meanwhile)",
                    node.name
                ),
            )),
        }
    })?;
    let record = NodeRecord {
        name: node.name.clone(),
        labels: node.labels.clone(),
        serial: id.serial.clone(),
        previous_serial,
        current_seen: false,
        not_after: id.not_after,
        revoked: false,
        revoked_at: 0,
        last_seen: now_unix(),
        version: 0,
    };
    // The database keeps a revocation through this (the upsert never
    // touches it); memory keeps it below.
    let mut record = record;
    let refused = match shared.state.upsert_node(&record, generation.replace(), now_unix()).await {
        Ok(Upsert::Stored(version)) => {
            record.version = version;
            None
        }
        Ok(Upsert::Revoked) => Some(revoked()),
        Ok(Upsert::Conflict) => Some(err(
            ErrorCode::Unauthenticated,
            format!(
                "node {} changed at another broker meanwhile (enrolled under this name, or its identity renewed \
                 and used); to re-enroll it use a token pinned to it ('grantline token create --node {}')",
                node.name, node.name
            ),
        )),
        Err(e) => Some(err(ErrorCode::Unavailable, format!("cannot record the node: {e}"))),
    };
    if let Some(reply) = refused {
        // The identity's issue is in the log: so is that it was never
        // recorded nor delivered.
        let reason = match &reply.body {
            Some(Resp::Error(e)) => format!("identity {} not delivered: {}", id.serial, e.message),
            _ => format!("identity {} not delivered", id.serial),
        };
        let event = Event::Denial {
            action: "identity".into(),
            node: node.name.clone(),
            kind: String::new(),
            role: String::new(),
            policy: String::new(),
            reason,
            caller: None,
        };
        audit_denial(shared, event).await;
        return Err(reply);
    }
    if !shared.registry.record(record) {
        return Err(revoked());
    }
    let identity = wire::NodeIdentity {
        node_name: node.name.clone(),
        labels: node.labels.clone().into_iter().collect(),
        chain_der: id.chain_der,
        not_after_unix: id.not_after,
    };
    Ok((identity, receipt))
}

async fn renew_identity(shared: &Shared, node: &NodeAttrs, from: &str, r: wire::RenewIdentityRequest) -> Reply {
    let csr = match check_csr(&r.csr_der) {
        Ok(c) => c,
        Err(e) => return err(ErrorCode::BadRequest, e),
    };
    let event = |id: &IssuedIdentity| Event::IdentityRenewal {
        node: node.name.clone(),
        serial: id.serial.clone(),
        fingerprint: id.fingerprint.clone(),
        not_after: id.not_after,
    };
    match grant_identity(shared, node, &csr, Generation::Renewal { from: from.to_owned() }, event).await {
        Ok((identity, receipt)) => Reply {
            body: Some(Resp::RenewIdentity(wire::RenewIdentityResponse {
                identity: Some(identity),
                receipt: Some(receipt),
            })),
        },
        Err(reply) => reply,
    }
}

/// A grant through the grant service, its outcome mapped to the wire.
async fn grant(shared: &Shared, node: &NodeAttrs, r: wire::GrantRequest) -> Reply {
    let policy = shared.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    match shared.grants.grant(&policy, node, &r).await {
        Ok(granted) => Reply { body: Some(Resp::Grant(granted)) },
        Err(e) => {
            let code = match &e {
                GrantError::BadRequest(_) => ErrorCode::BadRequest,
                GrantError::Denied(_) => ErrorCode::PermissionDenied,
                GrantError::Revoked(_) => ErrorCode::Revoked,
                GrantError::Unavailable(_) => ErrorCode::Unavailable,
                GrantError::Internal(_) => ErrorCode::Internal,
            };
            err(code, e.to_string())
        }
    }
}

async fn release(shared: &Shared, node: &NodeAttrs, r: wire::ReleaseRequest) -> Reply {
    let Some(vault) = &shared.vault else {
        return err(ErrorCode::BadRequest, "this broker has no Vault backend, so it holds no leases");
    };
    let lease = match shared.state.lease(&r.lease_id).await {
        Ok(Some(l)) => l,
        Ok(None) => return err(ErrorCode::BadRequest, "no such lease was granted by this broker"),
        Err(e) => return err(ErrorCode::Unavailable, format!("cannot read leases: {e}")),
    };
    if lease.node != node.name {
        let event = Event::Denial {
            action: "release".into(),
            node: node.name.clone(),
            kind: "secret".into(),
            role: String::new(),
            policy: String::new(),
            reason: format!("lease {} belongs to another node", lease.fingerprint),
            caller: None,
        };
        audit_denial(shared, event).await;
        return err(ErrorCode::PermissionDenied, "that lease was granted to another node");
    }
    match revoke_lease(shared, vault, &lease, "released by the node").await {
        Ok(receipt) => Reply { body: Some(Resp::Release(wire::ReleaseResponse { receipt: Some(receipt) })) },
        Err(reason) => err(ErrorCode::Unavailable, reason),
    }
}

/// The inclusion proof of entry `index` in the latest checkpoint.
async fn prove(shared: &Shared, index: u64) -> Reply {
    let Some(note) = shared.audit.checkpoints().borrow().clone() else {
        return err(ErrorCode::Unavailable, "no checkpoint has been signed yet; retry in a second");
    };
    let reader = shared.audit_reader.clone();
    let built = tokio::task::spawn_blocking(move || {
        reader.with(|store| crate::audit::prove::prove(store, &note, crate::audit::prove::Which::Inclusion(index)))
    })
    .await;
    match built {
        Ok(Ok((tlog_proof, _))) => Reply { body: Some(Resp::Prove(wire::ProveResponse { tlog_proof })) },
        Ok(Err(e)) => err(ErrorCode::Unavailable, format!("{e:#}")),
        Err(e) => err(ErrorCode::Internal, format!("proof task failed: {e}")),
    }
}
