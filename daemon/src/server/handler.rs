//! Request handling: enrollment, identity renewal and grants. Each path ends
//! the same way: nothing leaves the broker before its audit entry is durable.

use std::time::{Duration, SystemTime};

use grantline_proto::audit::event::CallerInfo;
use grantline_proto::audit::Event;
use grantline_proto::wire::{self, request::Body as Req, response::Body as Resp, ErrorCode};

use super::identity::{check_node_name, issue_identity, PeerNode};
use super::Shared;
use crate::issuer::{check_csr, IssueError, Order};
use crate::policy::{decide, Decision, Kind, NodeAttrs, PolicyRequest};
use crate::state::{NodeRecord, TokenError};

type Reply = wire::Response;

pub(crate) fn now_unix() -> i64 {
    crate::issuer::embedded::unix(SystemTime::now())
}

fn err(code: ErrorCode, msg: impl Into<String>) -> Reply {
    Reply { body: Some(Resp::Error(wire::Error::new(code, msg))) }
}

pub(crate) async fn handle(shared: &Shared, peer: Option<&PeerNode>, req: wire::Request) -> Reply {
    match req.body {
        None => err(ErrorCode::BadRequest, "empty request: set one of enroll, renew_identity, grant"),
        Some(Req::Enroll(r)) => enroll(shared, r).await,
        Some(Req::RenewIdentity(r)) => match authenticate(shared, peer) {
            Ok(node) => renew_identity(shared, &node, r).await,
            Err(reply) => reply,
        },
        Some(Req::Grant(r)) => match authenticate(shared, peer) {
            Ok(node) => grant(shared, &node, r).await,
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
    let nodes = shared.nodes.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    match nodes.get(&peer.name) {
        Some(n) if n.revoked => Err(err(ErrorCode::Revoked, format!("node {} has been revoked", peer.name))),
        Some(n) => Ok(NodeAttrs { name: n.name.clone(), labels: n.labels.clone() }),
        None => Err(err(ErrorCode::Unauthenticated, format!("node {} is not enrolled with this broker", peer.name))),
    }
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
    let redeemed = match shared.state.redeem_token(&r.token, &r.node_name, now_unix()) {
        Ok(t) => t,
        Err(e) => {
            audit_denial(shared, deny(e.to_string(), &r.node_name)).await;
            let code = if matches!(e, TokenError::Store(_)) { ErrorCode::Unavailable } else { ErrorCode::InvalidToken };
            return err(code, e.to_string());
        }
    };
    let Some(name) = redeemed.node.clone().or_else(|| Some(r.node_name.clone()).filter(|n| !n.is_empty())) else {
        audit_denial(shared, deny("the token pins no node name and the request gave none".into(), "")).await;
        return err(ErrorCode::BadRequest, "the token pins no node name, so the request must give one (--name)");
    };
    let revoked =
        shared.nodes.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&name).is_some_and(|n| n.revoked);
    if revoked {
        audit_denial(shared, deny(format!("node {name} has been revoked"), &name)).await;
        return err(ErrorCode::Revoked, format!("node {name} has been revoked and cannot enroll again"));
    }
    let id = match issue_identity(&shared.pki, &name, &csr, shared.identity_ttl) {
        Ok(id) => id,
        Err(e) => return err(ErrorCode::BadRequest, e),
    };
    let event = Event::Enrollment {
        node: name.clone(),
        labels: redeemed.labels.clone(),
        token_id: redeemed.id.clone(),
        serial: id.serial.clone(),
        fingerprint: id.fingerprint.clone(),
        not_after: id.not_after,
    };
    let receipt = match shared.audit.append(event).await {
        Ok(r) => r,
        Err(e) => return err(ErrorCode::Unavailable, e.to_string()),
    };
    let record = NodeRecord {
        name: name.clone(),
        labels: redeemed.labels.clone(),
        serial: id.serial,
        not_after: id.not_after,
        revoked: false,
    };
    if let Err(e) = shared.state.upsert_node(&record, now_unix()) {
        return err(ErrorCode::Unavailable, format!("cannot record the node: {e}"));
    }
    shared.nodes.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.clone(), record);
    tracing::info!(node = %name, token = %redeemed.id, "node enrolled");
    Reply {
        body: Some(Resp::Enroll(wire::EnrollResponse {
            identity: Some(wire::NodeIdentity {
                node_name: name,
                labels: redeemed.labels.into_iter().collect(),
                chain_der: id.chain_der,
                not_after_unix: id.not_after,
            }),
            receipt: Some(receipt),
            audit_vkey: shared.vkey.to_string(),
        })),
    }
}

async fn renew_identity(shared: &Shared, node: &NodeAttrs, r: wire::RenewIdentityRequest) -> Reply {
    let csr = match check_csr(&r.csr_der) {
        Ok(c) => c,
        Err(e) => return err(ErrorCode::BadRequest, e),
    };
    let id = match issue_identity(&shared.pki, &node.name, &csr, shared.identity_ttl) {
        Ok(id) => id,
        Err(e) => return err(ErrorCode::BadRequest, e),
    };
    let event = Event::IdentityRenewal {
        node: node.name.clone(),
        serial: id.serial.clone(),
        fingerprint: id.fingerprint.clone(),
        not_after: id.not_after,
    };
    let receipt = match shared.audit.append(event).await {
        Ok(r) => r,
        Err(e) => return err(ErrorCode::Unavailable, e.to_string()),
    };
    let record = NodeRecord {
        name: node.name.clone(),
        labels: node.labels.clone(),
        serial: id.serial,
        not_after: id.not_after,
        revoked: false,
    };
    if let Err(e) = shared.state.upsert_node(&record, now_unix()) {
        return err(ErrorCode::Unavailable, format!("cannot record the renewed identity: {e}"));
    }
    shared.nodes.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(node.name.clone(), record);
    Reply {
        body: Some(Resp::RenewIdentity(wire::RenewIdentityResponse {
            identity: Some(wire::NodeIdentity {
                node_name: node.name.clone(),
                labels: node.labels.clone().into_iter().collect(),
                chain_der: id.chain_der,
                not_after_unix: id.not_after,
            }),
            receipt: Some(receipt),
        })),
    }
}

/// The checked parts of a grant request, before policy.
struct Parsed {
    kind: Kind,
    names: Vec<String>,
    order: Order,
}

fn parse_grant(node: &NodeAttrs, r: &wire::GrantRequest) -> Result<Parsed, String> {
    let kind = match wire::CredentialKind::try_from(r.kind) {
        Ok(wire::CredentialKind::X509) => Kind::X509,
        Ok(wire::CredentialKind::SshUser) => Kind::SshUser,
        Ok(wire::CredentialKind::SshHost) => Kind::SshHost,
        _ => return Err(format!("unknown credential kind {}; use x509, ssh-user or ssh-host", r.kind)),
    };
    if r.role.is_empty() {
        return Err("the request names no role".into());
    }
    let ttl = Duration::from_secs(u64::from(r.ttl_seconds));
    match kind {
        Kind::X509 => {
            let csr = check_csr(&r.csr_der)?;
            let names = if r.sans.is_empty() { csr.sans.clone() } else { r.sans.clone() };
            for n in &names {
                crate::pki::parse_san(n)?;
            }
            let order = Order::X509 { node: node.name.clone(), role: r.role.clone(), csr, sans: names.clone(), ttl };
            Ok(Parsed { kind, names, order })
        }
        Kind::SshUser | Kind::SshHost => {
            let key = ssh_key::PublicKey::from_openssh(&r.ssh_public_key)
                .map_err(|e| format!("ssh_public_key is not an OpenSSH public key: {e}"))?;
            for p in &r.principals {
                if p.is_empty() || p.len() > 256 || p.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',') {
                    return Err(format!("principal {p:?} is not valid"));
                }
            }
            let order = Order::Ssh {
                node: node.name.clone(),
                role: r.role.clone(),
                public_key: key,
                principals: r.principals.clone(),
                ttl,
                host: kind == Kind::SshHost,
            };
            Ok(Parsed { kind, names: r.principals.clone(), order })
        }
    }
}

fn with_ttl(order: Order, capped: Duration) -> Order {
    match order {
        Order::X509 { node, role, csr, sans, .. } => Order::X509 { node, role, csr, sans, ttl: capped },
        Order::Ssh { node, role, public_key, principals, host, .. } => {
            Order::Ssh { node, role, public_key, principals, ttl: capped, host }
        }
    }
}

async fn grant(shared: &Shared, node: &NodeAttrs, r: wire::GrantRequest) -> Reply {
    let policy = shared.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let caller = r.caller.as_ref().map(|c| CallerInfo { uid: c.uid, gid: c.gid, pid: c.pid, exe: c.exe.clone() });
    let kind_name = wire::CredentialKind::try_from(r.kind).map(|k| k.policy_name()).unwrap_or("unknown");
    let denial = |reason: String| Event::Denial {
        action: "grant".into(),
        node: node.name.clone(),
        kind: kind_name.into(),
        role: r.role.clone(),
        policy: policy.hash().into(),
        reason,
        caller: caller.clone(),
    };
    let parsed = match parse_grant(node, &r) {
        Ok(p) => p,
        Err(e) => {
            audit_denial(shared, denial(format!("bad request: {e}"))).await;
            return err(ErrorCode::BadRequest, e);
        }
    };
    let ask = PolicyRequest {
        kind: parsed.kind,
        role: &r.role,
        ttl: (r.ttl_seconds > 0).then(|| Duration::from_secs(u64::from(r.ttl_seconds))),
        names: &parsed.names,
    };
    let (rule, ttl) = match decide(&policy, &ask, node) {
        Decision::Allow { rule, ttl } => (rule, ttl),
        Decision::Deny { reason } => {
            tracing::info!(node = %node.name, kind = kind_name, role = %r.role, %reason, "grant denied");
            audit_denial(shared, denial(reason.clone())).await;
            return err(ErrorCode::PermissionDenied, reason);
        }
    };
    let order = with_ttl(parsed.order, ttl);
    let issued = match shared.issuer.issue(&order).await {
        Ok(i) => i,
        Err(e) => {
            audit_denial(shared, denial(format!("issuer failed: {e}"))).await;
            let code = match e {
                IssueError::BadRequest(_) => ErrorCode::BadRequest,
                IssueError::Unavailable(_) => ErrorCode::Unavailable,
                IssueError::Internal(_) => ErrorCode::Internal,
            };
            return err(code, e.to_string());
        }
    };
    let event = Event::Grant {
        node: node.name.clone(),
        kind: kind_name.into(),
        role: r.role.clone(),
        rule,
        policy: policy.hash().into(),
        ttl_seconds: ttl.as_secs(),
        serial: issued.serial.clone(),
        fingerprint: issued.fingerprint.clone(),
        names: parsed.names,
        not_after: issued.not_after,
        caller,
    };
    let receipt = match shared.audit.append(event).await {
        Ok(r) => r,
        // Fail closed: the credential is dropped here, never sent.
        Err(e) => return err(ErrorCode::Unavailable, e.to_string()),
    };
    tracing::info!(node = %node.name, kind = kind_name, role = %r.role, serial = %issued.serial, "granted");
    Reply {
        body: Some(Resp::Grant(wire::GrantResponse {
            kind: r.kind,
            cert_pem: issued.cert_pem,
            chain_pem: issued.chain_pem,
            ssh_certificate: issued.ssh_certificate,
            not_before_unix: issued.not_before,
            not_after_unix: issued.not_after,
            receipt: Some(receipt),
        })),
    }
}
