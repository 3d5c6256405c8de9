//! Request handling: enrollment, identity renewal and grants. Each path ends
//! the same way: nothing leaves the broker before its audit entry is durable.

use std::time::Duration;

use grantline_proto::audit::event::{excerpt, CallerInfo};
use grantline_proto::audit::Event;
use grantline_proto::wire::{self, request::Body as Req, response::Body as Resp, ErrorCode};

use super::identity::{check_node_name, issue_identity, IssuedIdentity, PeerNode};
use super::revoke::revoke_lease;
use super::shared::Shared;
use crate::issuer::{check_csr, CheckedCsr, IssueError, Issued, Issuer, Order, What};
use crate::policy::{decide, Allowed, Decision, Kind, NodeAttrs, PolicyRequest};
use crate::state::{LeaseRecord, NodeRecord, TokenError};

type Reply = wire::Response;

/// Token accessors are kept in the lease table under this prefix.
pub(crate) use grantline_proto::audit::event::TOKEN_ACCESSOR_PREFIX;

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
    shared.registry.with(&peer.name, |known| match known {
        Some(n) if n.revoked => Err(err(ErrorCode::Revoked, format!("node {} has been revoked", peer.name))),
        Some(n) if !n.speaks_for(&peer.serial) => {
            Err(err(ErrorCode::Unauthenticated, crate::state::replaced_identity(&peer.name, &peer.serial)))
        }
        Some(n) => Ok(NodeAttrs { name: n.name.clone(), labels: n.labels.clone() }),
        None => Err(err(ErrorCode::Unauthenticated, format!("node {} is not enrolled with this broker", peer.name))),
    })
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
    match grant_identity(shared, &node, &csr, Generation::Enrollment, event).await {
        Ok((identity, receipt)) => {
            tracing::info!(node = %node.name, token = %redeemed.id, "node enrolled");
            Reply {
                body: Some(Resp::Enroll(wire::EnrollResponse {
                    identity: Some(identity),
                    receipt: Some(receipt),
                    audit_vkey: shared.vkey.to_string(),
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
    Enrollment,
    Renewal { from: String },
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
            (Generation::Enrollment, _) => Ok(String::new()),
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
    };
    // The database keeps a revocation through this (the upsert never
    // touches it); memory keeps it below.
    shared
        .state
        .upsert_node(&record, now_unix())
        .await
        .map_err(|e| err(ErrorCode::Unavailable, format!("cannot record the node: {e}")))?;
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

/// The most SANs, principals or policies one request may name.
const MAX_NAMES: usize = 64;

/// The checked parts of a grant request, before policy.
pub(super) struct Parsed {
    kind: Kind,
    names: Vec<String>,
    what: What,
}

/// The checks a grant request passes before policy decides (kind, role,
/// names, CSR or SSH key): the broker's first parser of what a node sends,
/// public for the fuzz targets.
pub fn check_grant_request(r: &wire::GrantRequest) -> Result<(), String> {
    parse_grant(r).map(|_| ())
}

fn parse_grant(r: &wire::GrantRequest) -> Result<Parsed, String> {
    let Some(kind) = Kind::from_wire(r.kind) else {
        return Err(format!("unknown credential kind {}; use {}", r.kind, Kind::names()));
    };
    if r.role.is_empty() {
        return Err("the request names no role".into());
    }
    // Every name lands in the audit entry, which must stay small.
    for (what, n) in
        [("SANs", r.sans.len()), ("principals", r.principals.len()), ("Vault policies", r.vault_policies.len())]
    {
        if n > MAX_NAMES {
            return Err(format!("the request lists {n} {what}; at most {MAX_NAMES} are allowed"));
        }
    }
    crate::policy::check_role(&r.role)?;
    let plain = |what: &str, v: &str| -> Result<(), String> {
        if v.is_empty() || v.len() > 256 || v.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',') {
            return Err(format!("{what} {:?} is not valid", excerpt(v, 80)));
        }
        Ok(())
    };
    match kind {
        Kind::X509 => {
            let csr = check_csr(&r.csr_der)?;
            let names = if r.sans.is_empty() { csr.sans.clone() } else { r.sans.clone() };
            for n in &names {
                crate::pki::parse_san(n)?;
            }
            csr.names_within(&names)?;
            Ok(Parsed { kind, what: What::X509 { csr, sans: names.clone() }, names })
        }
        Kind::SshUser | Kind::SshHost => {
            let key = ssh_key::PublicKey::from_openssh(&r.ssh_public_key)
                .map_err(|e| format!("ssh_public_key is not an OpenSSH public key: {e}"))?;
            crate::issuer::keys::check_ssh_key(&key)?;
            for p in &r.principals {
                plain("principal", p)?;
                // sshd matches a host certificate's principals as patterns
                // (and a user's against authorized_principals lists): a
                // principal is a literal name, never a pattern.
                if p.contains(['*', '?', '!']) {
                    return Err(format!(
                        "principal {:?} contains a pattern character ('*', '?' or '!'); principals are literal names",
                        excerpt(p, 80)
                    ));
                }
            }
            let what = What::Ssh { public_key: key, principals: r.principals.clone(), host: kind == Kind::SshHost };
            Ok(Parsed { kind, names: r.principals.clone(), what })
        }
        Kind::VaultToken => {
            for p in &r.vault_policies {
                plain("Vault policy", p)?;
            }
            // Vault trims and lower-cases policy names, so every check
            // (the root refusal, the policy's globs) sees them as Vault will.
            let policies: Vec<String> = r.vault_policies.iter().map(|p| crate::policy::vault_policy_name(p)).collect();
            if policies.iter().any(|p| p == "root") {
                return Err("the root policy is never granted".into());
            }
            if policies.is_empty() || policies.iter().all(|p| p == "default") {
                // With `no_default_policy` such a token would carry no
                // policy at all; without it, only `default`, which needs no broker.
                return Err(
                    "the request names no Vault policy besides \"default\"; name the policies the token needs".into()
                );
            }
            let what = What::VaultToken { policies: policies.clone(), num_uses: r.num_uses };
            Ok(Parsed { kind, names: policies, what })
        }
        Kind::DynamicSecret => Ok(Parsed { kind, names: Vec::new(), what: What::Secret { path: String::new() } }),
    }
}

/// Applies what policy allowed: caps on uses, the leased path.
fn bind_to_policy(what: What, allowed: &Allowed) -> What {
    match what {
        What::VaultToken { policies, num_uses } => {
            let num_uses = match allowed.max_uses {
                Some(cap) if num_uses == 0 || num_uses > cap => cap,
                _ => num_uses,
            };
            What::VaultToken { policies, num_uses }
        }
        What::Secret { .. } => What::Secret { path: allowed.path.clone() },
        other => other,
    }
}

async fn grant(shared: &Shared, node: &NodeAttrs, r: wire::GrantRequest) -> Reply {
    let policy = shared.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let caller = r.caller.as_ref().map(|c| CallerInfo {
        uid: c.uid,
        gid: c.gid,
        pid: c.pid,
        exe: c.exe.clone(),
        unit: c.unit.clone(),
    });
    let kind_name = Kind::name_of_wire(r.kind);
    let denial = |reason: String| Event::Denial {
        action: "grant".into(),
        node: node.name.clone(),
        kind: kind_name.into(),
        role: r.role.clone(),
        policy: policy.hash().into(),
        reason,
        caller: caller.clone(),
    };
    let parsed = match parse_grant(&r) {
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
    let allowed = match decide(&policy, &ask, node) {
        Decision::Allow(a) => a,
        Decision::Deny { reason } => {
            tracing::info!(node = %node.name, kind = kind_name, role = %r.role, %reason, "grant denied");
            audit_denial(shared, denial(reason.clone())).await;
            return err(ErrorCode::PermissionDenied, reason);
        }
    };
    let order = Order {
        node: node.name.clone(),
        role: r.role.clone(),
        ttl: allowed.ttl,
        what: bind_to_policy(parsed.what, &allowed),
    };
    let issued = match shared.issuer.issue(&order).await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(node = %node.name, kind = kind_name, role = %r.role, error = %e, "issuing failed");
            audit_denial(shared, denial(format!("issuer failed: {e}"))).await;
            let code = match e {
                IssueError::BadRequest(_) => ErrorCode::BadRequest,
                IssueError::Unavailable(_) => ErrorCode::Unavailable,
                IssueError::Internal(_) => ErrorCode::Internal,
            };
            return err(code, e.to_string());
        }
    };
    let names = match &order.what {
        What::Secret { path } => vec![path.clone()],
        _ => parsed.names,
    };
    let event = Event::Grant {
        node: node.name.clone(),
        kind: kind_name.into(),
        role: r.role.clone(),
        rule: allowed.rule,
        policy: policy.hash().into(),
        ttl_seconds: u64::try_from(issued.not_after - now_unix()).unwrap_or(0).min(allowed.ttl.as_secs()),
        serial: issued.serial.clone(),
        fingerprint: issued.fingerprint.clone(),
        names,
        not_after: issued.not_after,
        caller,
    };
    let receipt = match shared.audit.append(event).await {
        Ok(r) => r,
        Err(e) => {
            // Fail closed: the credential is never sent, and what Vault
            // already created is withdrawn.
            withdraw(shared, &issued).await;
            return err(ErrorCode::Unavailable, e.to_string());
        }
    };
    // Leases, and token accessors under a prefix, are kept so that a node's
    // revocation can revoke them in Vault.
    let revocable = if issued.lease_id.is_empty() {
        (!issued.token_accessor.is_empty()).then(|| format!("{TOKEN_ACCESSOR_PREFIX}{}", issued.token_accessor))
    } else {
        Some(issued.lease_id.clone())
    };
    if let Some(lease_id) = revocable {
        let lease = LeaseRecord {
            lease_id,
            node: node.name.clone(),
            fingerprint: issued.fingerprint.clone(),
            expires_at: issued.not_after,
        };
        if let Err(e) = shared.state.record_lease(&lease).await {
            withdraw(shared, &issued).await;
            return err(ErrorCode::Unavailable, format!("cannot record the lease: {e}"));
        }
    }
    // A revocation that landed while this grant was being minted: either it
    // listed the lease just recorded, or the flag it set is seen here, and
    // the credential is withdrawn rather than delivered.
    if shared.registry.is_out(&node.name) {
        withdraw(shared, &issued).await;
        return err(ErrorCode::Revoked, format!("node {} was revoked while the credential was minted", node.name));
    }
    let seq = grantline_proto::audit::Entry::decode(&receipt.entry).map(|e| e.seq).unwrap_or(u64::MAX);
    tracing::info!(node = %node.name, kind = kind_name, role = %r.role, seq, serial = %issued.serial, fingerprint = %issued.fingerprint, "granted");
    Reply {
        body: Some(Resp::Grant(wire::GrantResponse {
            kind: r.kind,
            cert_pem: issued.cert_pem,
            chain_pem: issued.chain_pem,
            ssh_certificate: issued.ssh_certificate,
            not_before_unix: issued.not_before,
            not_after_unix: issued.not_after,
            receipt: Some(receipt),
            vault_token: issued.vault_token,
            token_accessor: issued.token_accessor,
            secret_json: issued.secret_json,
            lease_id: issued.lease_id,
        })),
    }
}

/// Revokes a Vault credential that will not be delivered.
async fn withdraw(shared: &Shared, issued: &Issued) {
    let Some(vault) = &shared.vault else { return };
    let result = if !issued.lease_id.is_empty() {
        vault.revoke_lease(&issued.lease_id).await
    } else if !issued.token_accessor.is_empty() {
        vault.revoke_accessor(&issued.token_accessor).await
    } else {
        return;
    };
    if let Err(e) = result {
        tracing::error!(fingerprint = %issued.fingerprint, error = %e, "could not withdraw an undelivered Vault credential");
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
    let built = tokio::task::spawn_blocking(move || -> Result<String, (ErrorCode, String)> {
        let unavailable = |m: String| (ErrorCode::Unavailable, m);
        let body = grantline_proto::audit::note::body(&note)
            .ok_or_else(|| unavailable("the latest checkpoint is not a note".into()))?;
        let cp =
            grantline_proto::audit::checkpoint::Checkpoint::parse_body(body).map_err(|e| unavailable(e.to_string()))?;
        if index >= cp.size {
            return Err(unavailable(format!(
                "entry {index} is not in the latest checkpoint (size {}) yet; retry in a second",
                cp.size
            )));
        }
        let proof = reader
            .with(|store| grantline_proto::audit::merkle::inclusion_proof(store, index, cp.size))
            .map_err(|e| unavailable(format!("cannot build the proof: {e}")))?;
        Ok(grantline_proto::audit::checkpoint::InclusionReceipt { index, proof, checkpoint_note: note }.format())
    })
    .await;
    match built {
        Ok(Ok(tlog_proof)) => Reply { body: Some(Resp::Prove(wire::ProveResponse { tlog_proof })) },
        Ok(Err((code, message))) => err(code, message),
        Err(e) => err(ErrorCode::Internal, format!("proof task failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb2X0Yb+6Qf9V3Q2Hn0Bq7Z8yq6zG0cV7tJ0mYbPzqS";

    fn ssh(principals: &[&str]) -> Result<Parsed, String> {
        parse_grant(&wire::GrantRequest {
            kind: wire::CredentialKind::SshHost as i32,
            role: "dev".into(),
            ssh_public_key: ED25519.into(),
            principals: principals.iter().map(|p| (*p).to_owned()).collect(),
            ..Default::default()
        })
    }

    fn token(policies: &[&str]) -> Result<Parsed, String> {
        parse_grant(&wire::GrantRequest {
            kind: wire::CredentialKind::VaultToken as i32,
            role: "dev".into(),
            vault_policies: policies.iter().map(|p| (*p).to_owned()).collect(),
            ..Default::default()
        })
    }

    /// Review defect 11: `web-*.example.com` matched the policy glob
    /// `web-?.example.com` and became a host certificate for every web host.
    #[test]
    fn principals_are_literal_names() {
        assert_eq!(ssh(&["web-1.example.com"]).unwrap().names, vec!["web-1.example.com".to_owned()]);
        for p in ["web-*.example.com", "web-?.example.com", "!root", "a,b", "a b", "a\tb", ""] {
            let e = ssh(&[p]).err().unwrap_or_else(|| panic!("{p:?} was accepted"));
            assert!(e.contains("principal"), "{p:?}: {e}");
        }
    }

    /// Review defect 14: Vault lower-cases and trims policy names, so `ROOT`
    /// was the root policy; and a request for `default` alone can only
    /// yield a token without a useful policy.
    #[test]
    fn vault_policy_names_are_checked_as_vault_reads_them() {
        for p in ["root", "ROOT", "Root", "rOoT"] {
            assert_eq!(token(&[p]).err().as_deref(), Some("the root policy is never granted"), "{p}");
        }
        assert!(token(&[" root"]).is_err(), "white space is refused before Vault can trim it");
        let parsed = token(&["App-Read"]).unwrap();
        assert_eq!(parsed.names, vec!["app-read".to_owned()], "globs see the name Vault will store");
        let What::VaultToken { policies, .. } = parsed.what else { panic!("a token order") };
        assert_eq!(policies, vec!["app-read".to_owned()]);
        assert!(token(&["default"]).err().unwrap_or_default().contains("besides \"default\""));
        assert!(token(&["DEFAULT"]).is_err());
    }

    #[test]
    fn roles_are_plain_names_and_never_path_steps() {
        for role in [".", "..", "a/b", "*", "app-*", "", &"r".repeat(129)] {
            let r = parse_grant(&wire::GrantRequest {
                kind: wire::CredentialKind::DynamicSecret as i32,
                role: role.to_owned(),
                ..Default::default()
            });
            let e = r.err().unwrap_or_else(|| panic!("role {role:?} was accepted"));
            assert!(e.contains("role") && e.len() < 400, "{role:?}: {e}");
        }
    }
}
