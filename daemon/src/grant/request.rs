//! A grant request as a node sends it, checked before policy sees it: the
//! kind, the role, every name, and the CSR or SSH key. Pure; the broker's
//! first parser of what a node sends (fuzzed by `tests/fuzz`).

use grantline_proto::audit::event::excerpt;
use grantline_proto::kind::Kind;
use grantline_proto::wire;

use crate::issuer::{check_csr, What};
use crate::policy::Allowed;

/// The most SANs, principals or policies one request may name.
const MAX_NAMES: usize = 64;

/// The checked parts of a grant request, before policy.
pub(crate) struct Parsed {
    pub(crate) kind: Kind,
    pub(crate) names: Vec<String>,
    pub(crate) what: What,
}

/// The checks a grant request passes before policy decides (kind, role,
/// names, CSR or SSH key): the broker's first parser of what a node sends,
/// public for the fuzz targets.
pub fn check_grant_request(r: &wire::GrantRequest) -> Result<(), String> {
    parse_grant(r).map(|_| ())
}

pub(crate) fn parse_grant(r: &wire::GrantRequest) -> Result<Parsed, String> {
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
        Kind::X509Svid | Kind::JwtSvid => {
            if r.caller.is_none() {
                return Err("SVIDs are issued to a local caller: ask through the node's agent".into());
            }
            if !r.spiffe_id.is_empty() {
                if r.spiffe_id.len() > 2048 {
                    return Err("the SPIFFE ID asked for is longer than 2048 bytes".into());
                }
                spiffe::SpiffeId::new(&r.spiffe_id)
                    .map_err(|e| format!("{:?} is not a SPIFFE ID: {e}", excerpt(&r.spiffe_id, 120)))?;
            }
            if kind == Kind::X509Svid {
                let csr = check_csr(&r.csr_der)?;
                // An X509-SVID carries one name, its SPIFFE ID: the CSR asks for none.
                csr.names_within(&[])?;
                return Ok(Parsed { kind, names: Vec::new(), what: What::X509Svid { csr, spiffe_id: String::new() } });
            }
            if r.audience.is_empty() || r.audience.len() > crate::spiffe::MAX_AUDIENCES {
                return Err(format!(
                    "a JWT-SVID is bound to 1 to {} audiences; the request names {}",
                    crate::spiffe::MAX_AUDIENCES,
                    r.audience.len()
                ));
            }
            for a in &r.audience {
                crate::spiffe::check_audience(a)?;
            }
            let what = What::JwtSvid { spiffe_id: String::new(), audience: r.audience.clone() };
            Ok(Parsed { kind, names: r.audience.clone(), what })
        }
    }
}

/// Applies what policy allowed: caps on uses, the leased path.
pub(crate) fn bind_to_policy(what: What, allowed: &Allowed) -> What {
    match what {
        What::VaultToken { policies, num_uses } => {
            let num_uses = match allowed.max_uses {
                Some(cap) if num_uses == 0 || num_uses > cap => cap,
                _ => num_uses,
            };
            What::VaultToken { policies, num_uses }
        }
        What::Secret { .. } => What::Secret { path: allowed.path.clone() },
        What::X509Svid { csr, .. } => What::X509Svid { csr, spiffe_id: allowed.spiffe_id.clone() },
        What::JwtSvid { audience, .. } => What::JwtSvid { spiffe_id: allowed.spiffe_id.clone(), audience },
        other => other,
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

    fn svid(kind: wire::CredentialKind, csr: Vec<u8>, audience: &[&str], caller: bool) -> Result<(), String> {
        check_grant_request(&wire::GrantRequest {
            kind: kind as i32,
            role: "spiffe".into(),
            csr_der: csr,
            audience: audience.iter().map(|a| (*a).to_owned()).collect(),
            caller: caller.then(wire::Caller::default),
            ..Default::default()
        })
    }

    fn csr(names: Vec<String>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    /// SVIDs go to an attested caller only, name nothing but the ID policy
    /// gives, and bind a JWT-SVID to a bounded list of audiences.
    #[test]
    fn svid_requests_need_a_caller_no_csr_names_and_bounded_audiences() {
        use wire::CredentialKind::{JwtSvid, X509Svid};
        assert!(svid(X509Svid, csr(vec![]), &[], true).is_ok());
        assert!(svid(X509Svid, csr(vec![]), &[], false).unwrap_err().contains("local caller"));
        assert!(svid(X509Svid, csr(vec!["evil.example".into()]), &[], true).unwrap_err().contains("evil.example"));
        assert!(svid(JwtSvid, vec![], &["https://a.example"], true).is_ok());
        assert!(svid(JwtSvid, vec![], &[], true).unwrap_err().contains("audiences"));
        assert!(svid(JwtSvid, vec![], &["a b"], true).unwrap_err().contains("audience"));
        let many: Vec<String> = (0..17).map(|i| format!("a{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(svid(JwtSvid, vec![], &many, true).unwrap_err().contains("1 to 16"));
        let asked = parse_grant(&wire::GrantRequest {
            kind: JwtSvid as i32,
            role: "spiffe".into(),
            audience: vec!["a".into()],
            spiffe_id: "not a spiffe id".into(),
            caller: Some(wire::Caller::default()),
            ..Default::default()
        });
        assert!(asked.err().unwrap_or_default().contains("not a SPIFFE ID"));
    }
}
