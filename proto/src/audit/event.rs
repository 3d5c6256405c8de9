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
        /// SVIDs (RFD 0011): the SPIFFE ID issued to the caller.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        spiffe_id: String,
        /// JWT-SVIDs: the audiences the token is bound to.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        audience: Vec<String>,
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

/// The most bytes of one text field that an entry records. Longer text (a
/// hostile role, a parse error quoting a file) is cut at a character boundary
/// and marked with its full length, so one request cannot make an entry too
/// large to store, sign or publish.
pub const MAX_FIELD_LEN: usize = 1024;
/// The most items of one list or map that an entry records.
pub const MAX_ITEMS: usize = 64;

impl Event {
    /// This event with every text field, list and map cut to the bounds
    /// above. Events built from validated input are unchanged.
    #[must_use]
    pub fn bounded(self) -> Self {
        // Most events are small: no field of a short one can be long.
        if serde_json::to_vec(&self).is_ok_and(|j| j.len() <= MAX_FIELD_LEN) {
            return self;
        }
        let Ok(mut value) = serde_json::to_value(&self) else { return self };
        if !bound_value(&mut value) {
            return self;
        }
        serde_json::from_value(value).unwrap_or(self)
    }

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

/// Cuts `s` to at most [`MAX_FIELD_LEN`] bytes, marking the cut.
pub fn bound_text(s: &str) -> String {
    excerpt(s, MAX_FIELD_LEN)
}

/// `s` if it has at most `max` bytes (`max` ≥ 40), else its start cut at a
/// character boundary and marked with the full length, within `max` bytes:
/// what an error message or an entry may quote of untrusted text.
pub fn excerpt(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub(40);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[cut, {} bytes in all]", &s[..end], s.len())
}

/// Bounds every string, list and map in `v`; whether anything changed.
fn bound_value(v: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) if s.len() > MAX_FIELD_LEN => {
            *s = bound_text(s);
            true
        }
        Value::Array(items) => {
            let mut changed = false;
            if items.len() > MAX_ITEMS {
                let more = items.len() - (MAX_ITEMS - 1);
                items.truncate(MAX_ITEMS - 1);
                if items.iter().all(Value::is_string) {
                    items.push(Value::String(format!("…[{more} more]")));
                }
                changed = true;
            }
            items.iter_mut().fold(changed, |c, i| bound_value(i) | c)
        }
        Value::Object(map) => {
            let mut changed = false;
            // Keys are bounded like text; a cut key that collides is dropped.
            if map.len() > MAX_ITEMS || map.keys().any(|k| k.len() > MAX_FIELD_LEN) {
                let more = map.len().saturating_sub(MAX_ITEMS - 1);
                let kept: serde_json::Map<String, Value> =
                    std::mem::take(map).into_iter().take(MAX_ITEMS - 1).map(|(k, v)| (bound_text(&k), v)).collect();
                *map = kept;
                if more > 0 {
                    map.insert("…".into(), Value::String(format!("[{more} more]")));
                }
                changed = true;
            }
            map.values_mut().fold(changed, |c, i| bound_value(i) | c)
        }
        _ => false,
    }
}

/// Token accessors are released (and kept for revocation) under this
/// prefix: `token-accessor:<accessor>` names a Vault token where a lease id
/// would name a lease.
pub const TOKEN_ACCESSOR_PREFIX: &str = "token-accessor:";

/// The fingerprint a grant records for what `release` names: a lease id, or
/// a token accessor under [`TOKEN_ACCESSOR_PREFIX`].
pub fn released_fingerprint(id: &str) -> String {
    match id.strip_prefix(TOKEN_ACCESSOR_PREFIX) {
        Some(accessor) => vault_fingerprint("token-accessor", accessor),
        None => vault_fingerprint("lease", id),
    }
}

/// The fingerprint the log records for a certificate: SHA-256, hex, of its
/// DER (X.509) or of its wire encoding (SSH). The broker computes it when it
/// issues; the agent when it checks the receipt against what it received.
pub fn certificate_fingerprint(encoded: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(encoded))
}

/// The fingerprint a grant records for a bearer token it hands out (a
/// JWT-SVID): SHA-256 over the token, hex. The token itself is never logged.
pub fn token_fingerprint(token: &str) -> String {
    certificate_fingerprint(token.as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_events_cut_long_fields_and_keep_short_ones() {
        let short = Event::Denial {
            action: "grant".into(),
            node: "web-1".into(),
            kind: "x509".into(),
            role: "web".into(),
            policy: String::new(),
            reason: "no rule".into(),
            caller: None,
        };
        assert_eq!(short.clone().bounded(), short);

        let long = "é".repeat(20_000);
        let Event::Denial { role, reason, .. } = (Event::Denial {
            action: "grant".into(),
            node: "web-1".into(),
            kind: "x509".into(),
            role: long.clone(),
            policy: String::new(),
            reason: format!("unknown role {long}"),
            caller: None,
        })
        .bounded() else {
            panic!("the variant is kept")
        };
        assert!(role.len() <= MAX_FIELD_LEN && reason.len() <= MAX_FIELD_LEN, "{} {}", role.len(), reason.len());
        assert!(role.ends_with("…[cut, 40000 bytes in all]"), "{role}");

        let labels: BTreeMap<String, String> =
            (0..500).map(|i| (format!("k{i:03}{}", "x".repeat(2000)), "v".into())).collect();
        let names: Vec<String> = (0..500).map(|i| format!("n{i}")).collect();
        let e = Event::TokenCreation {
            token_id: "t".into(),
            node: String::new(),
            labels,
            expires_at: 0,
            admin: CallerInfo { uid: 0, gid: 0, pid: 1, exe: String::new(), unit: String::new() },
        }
        .bounded();
        let Event::TokenCreation { labels, .. } = e else { panic!("the variant is kept") };
        assert_eq!(labels.len(), MAX_ITEMS);
        assert!(labels.keys().all(|k| k.len() <= MAX_FIELD_LEN));
        let g = Event::Grant {
            node: "n".into(),
            kind: "x509".into(),
            role: "r".into(),
            rule: "r".into(),
            policy: "p".into(),
            ttl_seconds: 1,
            serial: "s".into(),
            fingerprint: "f".into(),
            names,
            not_after: 0,
            caller: None,
            spiffe_id: String::new(),
            audience: Vec::new(),
        }
        .bounded();
        let Event::Grant { names, .. } = g else { panic!("the variant is kept") };
        assert_eq!(names.len(), MAX_ITEMS);
        assert_eq!(names.last().map(String::as_str), Some("…[437 more]"));
    }
}
