//! One grant, from the node's request to the credential and its receipt.
//! Every outcome is audited: a denial before it is answered, a grant before
//! the credential leaves. When the grant cannot be recorded, or the node is
//! revoked while it was minted, the credential is withdrawn, not sent.

use std::sync::Arc;
use std::time::Duration;

use grantline_proto::audit::event::{CallerInfo, TOKEN_ACCESSOR_PREFIX};
use grantline_proto::audit::Event;
use grantline_proto::kind::Kind;
use grantline_proto::wire;

use super::ports::{AuditSink, Clock, Nodes};
use super::request::{bind_to_policy, parse_grant};
use crate::issuer::{IssueError, Issued, Issuer, Order, What};
use crate::policy::{decide, Decision, NodeAttrs, Policy, PolicyRequest};
use crate::state::{LeaseRecord, StateStore};

/// Why a grant was not made. Each is audited (but `Unavailable` for the
/// log itself, which could not record anything) before it is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The request is malformed or asks for what no backend can mint.
    #[error("{0}")]
    BadRequest(String),
    /// Policy does not allow it.
    #[error("{0}")]
    Denied(String),
    /// The node was revoked while the credential was minted.
    #[error("{0}")]
    Revoked(String),
    /// A backend or the audit log is down: retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A backend failed in a way a retry will not fix.
    #[error("{0}")]
    Internal(String),
}

/// The grant path over its ports.
pub struct GrantService {
    pub issuer: Arc<dyn Issuer>,
    pub audit: Arc<dyn AuditSink>,
    pub state: Arc<dyn StateStore>,
    pub clock: Arc<dyn Clock>,
    pub nodes: Arc<dyn Nodes>,
    /// The SPIFFE trust domain (RFD 0011); None issues no SVIDs.
    pub trust_domain: Option<String>,
}

impl GrantService {
    /// Grants `r` to the authenticated `node` under `policy`.
    pub async fn grant(
        &self,
        policy: &Policy,
        node: &NodeAttrs,
        r: &wire::GrantRequest,
    ) -> Result<wire::GrantResponse, GrantError> {
        // A fleet broker that lost its change feed for too long could miss
        // a revocation made elsewhere: it grants nothing until it is back.
        self.state.fresh().map_err(GrantError::Unavailable)?;
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
        let parsed = match parse_grant(r) {
            Ok(p) => p,
            Err(e) => {
                self.audit_denial(denial(format!("bad request: {e}"))).await;
                return Err(GrantError::BadRequest(e));
            }
        };
        let ask = PolicyRequest {
            kind: parsed.kind,
            role: &r.role,
            ttl: (r.ttl_seconds > 0).then(|| Duration::from_secs(u64::from(r.ttl_seconds))),
            names: &parsed.names,
            caller: caller.as_ref(),
            spiffe: self
                .trust_domain
                .as_deref()
                .map(|trust_domain| crate::policy::SpiffeAsk { trust_domain, spiffe_id: &r.spiffe_id }),
        };
        let allowed = match decide(policy, &ask, node) {
            Decision::Allow(a) => a,
            Decision::Deny { reason } => {
                tracing::info!(node = %node.name, kind = kind_name, role = %r.role, %reason, "grant denied");
                self.audit_denial(denial(reason.clone())).await;
                return Err(GrantError::Denied(reason));
            }
        };
        let order = Order {
            node: node.name.clone(),
            role: r.role.clone(),
            ttl: allowed.ttl,
            what: bind_to_policy(parsed.what, &allowed),
        };
        let issued = match self.issuer.issue(&order).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(node = %node.name, kind = kind_name, role = %r.role, error = %e, "issuing failed");
                self.audit_denial(denial(format!("issuer failed: {e}"))).await;
                return Err(match e {
                    IssueError::BadRequest(_) => GrantError::BadRequest(e.to_string()),
                    IssueError::Unavailable(_) => GrantError::Unavailable(e.to_string()),
                    IssueError::Internal(_) => GrantError::Internal(e.to_string()),
                });
            }
        };
        let (names, audience) = match &order.what {
            What::Secret { path } => (vec![path.clone()], Vec::new()),
            What::X509Svid { spiffe_id, .. } => (vec![spiffe_id.clone()], Vec::new()),
            What::JwtSvid { spiffe_id, audience } => (vec![spiffe_id.clone()], audience.clone()),
            _ => (parsed.names, Vec::new()),
        };
        let event = Event::Grant {
            node: node.name.clone(),
            kind: kind_name.into(),
            role: r.role.clone(),
            rule: allowed.rule,
            policy: policy.hash().into(),
            ttl_seconds: u64::try_from(issued.not_after - self.clock.now_unix())
                .unwrap_or(0)
                .min(allowed.ttl.as_secs()),
            serial: issued.serial.clone(),
            fingerprint: issued.fingerprint.clone(),
            names,
            not_after: issued.not_after,
            caller,
            spiffe_id: allowed.spiffe_id.clone(),
            audience,
        };
        let receipt = match self.audit.append(event).await {
            Ok(r) => r,
            Err(e) => {
                // Fail closed: the credential is never sent, and what Vault
                // already created is withdrawn.
                self.withdraw(&issued).await;
                return Err(GrantError::Unavailable(e.to_string()));
            }
        };
        // Leases, and token accessors under a prefix, are kept so that a
        // node's revocation can revoke them in Vault.
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
            if let Err(e) = self.state.record_lease(&lease).await {
                self.withdraw(&issued).await;
                return Err(GrantError::Unavailable(format!("cannot record the lease: {e}")));
            }
        }
        // A revocation that landed while this grant was being minted: either
        // it listed the lease just recorded, or the flag it set is seen
        // here, and the credential is withdrawn rather than delivered.
        if self.nodes.is_out(&node.name) {
            self.withdraw(&issued).await;
            return Err(GrantError::Revoked(format!("node {} was revoked while the credential was minted", node.name)));
        }
        let seq = grantline_proto::audit::Entry::decode(&receipt.entry).map(|e| e.seq).unwrap_or(u64::MAX);
        tracing::info!(node = %node.name, kind = kind_name, role = %r.role, seq, serial = %issued.serial, fingerprint = %issued.fingerprint, "granted");
        Ok(wire::GrantResponse {
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
            spiffe_id: issued.spiffe_id,
            jwt_svid: issued.jwt_svid,
            trust_domain: issued.trust_domain,
            x509_bundle_pem: issued.x509_bundle_pem,
            jwt_bundle_json: issued.jwt_bundle_json,
        })
    }

    async fn audit_denial(&self, event: Event) {
        if let Err(e) = self.audit.append(event).await {
            tracing::error!(error = %e, "could not audit a denial");
        }
    }

    /// Takes back a credential that will not be delivered.
    async fn withdraw(&self, issued: &Issued) {
        if let Err(e) = self.issuer.withdraw(issued).await {
            tracing::error!(fingerprint = %issued.fingerprint, error = %e, "could not withdraw an undelivered credential");
        }
    }
}
