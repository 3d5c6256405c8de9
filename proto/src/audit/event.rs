//! Audit events: what happened, in words a security team can read. Events name
//! credentials by serial number and fingerprint, never by their secret parts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The local process on a node that asked for a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerInfo {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub exe: String,
    /// The systemd unit the process runs in, from its cgroup.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Seq 0 of every log: names the key that signs it.
    Genesis { vkey: String, software: String },
    /// A node redeemed a join token and received its identity certificate.
    Enrollment {
        node: String,
        labels: BTreeMap<String, String>,
        token_id: String,
        serial: String,
        fingerprint: String,
        not_after: i64,
    },
    /// A node renewed its identity certificate over its mTLS connection.
    IdentityRenewal { node: String, serial: String, fingerprint: String, not_after: i64 },
    /// A credential was issued. `fingerprint` is SHA-256 over the certificate
    /// (DER for X.509, the wire blob for SSH), hex.
    Grant {
        node: String,
        kind: String,
        role: String,
        rule: String,
        policy: String,
        ttl_seconds: u64,
        serial: String,
        fingerprint: String,
        /// SANs (X.509) or principals (SSH) in the credential.
        names: Vec<String>,
        not_after: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caller: Option<CallerInfo>,
    },
    /// The log's signing key changes: this entry is signed by the old key and
    /// names the new one, which signs every later entry and checkpoint.
    KeyRotation { new_vkey: String },
    /// A leased credential was revoked before its expiry. `lease` is the
    /// grant's fingerprint of the lease id.
    LeaseRevocation { node: String, lease: String, reason: String },
    /// An issuing CA was replaced, e.g. the intermediate obtained from Vault PKI.
    CaRotation { ca: String, issuer: String, serial: String, fingerprint: String, not_after: i64 },
    /// An admin created a join token (the token itself is never logged).
    TokenCreation {
        token_id: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        node: String,
        labels: BTreeMap<String, String>,
        expires_at: i64,
        admin: CallerInfo,
    },
    /// An admin revoked a node: its connection was closed and its identity
    /// is refused from then on. Its leases' revocations follow as
    /// `lease_revocation` entries.
    NodeRevocation { node: String, serial: String, reason: String, admin: CallerInfo },
    /// The policy was reloaded (by SIGHUP when `admin` is absent). A refused
    /// policy is recorded with its error; the old one stays in force.
    PolicyReload {
        ok: bool,
        /// The hash of the policy in force after the attempt.
        policy: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        error: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        admin: Option<CallerInfo>,
    },
    /// An admin read the audit log through the admin API.
    AuditRead { what: String, admin: CallerInfo },
    /// A request was refused.
    Denial {
        /// "enroll", "renew_identity", "grant" or "release".
        action: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        node: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        kind: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        role: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        policy: String,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caller: Option<CallerInfo>,
    },
}

impl Event {
    /// A short name for logs and the verifier's summaries.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Genesis { .. } => "genesis",
            Self::Enrollment { .. } => "enrollment",
            Self::IdentityRenewal { .. } => "identity_renewal",
            Self::Grant { .. } => "grant",
            Self::Denial { .. } => "denial",
            Self::LeaseRevocation { .. } => "lease_revocation",
            Self::KeyRotation { .. } => "key_rotation",
            Self::CaRotation { .. } => "ca_rotation",
            Self::TokenCreation { .. } => "token_creation",
            Self::NodeRevocation { .. } => "node_revocation",
            Self::PolicyReload { .. } => "policy_reload",
            Self::AuditRead { .. } => "audit_read",
        }
    }
}

/// The fingerprint a grant records for a Vault lease or token accessor: a
/// domain-separated SHA-256, so the log names the credential without holding
/// anything that could be used against Vault.
pub fn vault_fingerprint(what: &str, id: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"grantline/");
    h.update(what.as_bytes());
    h.update(b"\n");
    h.update(id.as_bytes());
    hex::encode(h.finalize())
}
