//! Reading a policy file: TOML into checked rules, each problem named with
//! its rule and line.

use std::collections::BTreeMap;
use std::time::Duration;

use grantline_proto::kind::Kind;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::rules::{Allow, Callers, Policy, Rule};

/// The default leased path for `secret` grants.
pub const DEFAULT_SECRET_PATH: &str = "database/creds/{role}";

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy is not valid TOML: {0}")]
    Toml(String),
    #[error("policy rule {rule:?} (line {line}): {problem}")]
    Rule { rule: String, line: usize, problem: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default, rename = "rule")]
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: toml::Spanned<String>,
    #[serde(default)]
    nodes: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    allow: Vec<AllowFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowFile {
    kinds: Vec<String>,
    roles: Vec<String>,
    max_ttl: String,
    default_ttl: Option<String>,
    #[serde(default)]
    sans: Vec<String>,
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    vault_policies: Vec<String>,
    max_uses: Option<u32>,
    path: Option<String>,
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
    #[serde(default)]
    exe: Vec<String>,
    #[serde(default)]
    units: Vec<String>,
    #[serde(default)]
    spiffe_ids: Vec<String>,
    #[serde(default)]
    audiences: Vec<String>,
}

/// Checks a role name: what requests and policy rules name, and what may
/// reach a Vault path (`database/creds/{role}`), so plain and never a path
/// step of its own.
pub fn check_role(role: &str) -> Result<(), String> {
    let plain = role.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if role.is_empty() || role.len() > 128 || !plain || role == "." || role == ".." {
        return Err(format!(
            "role {:?} is not valid: use 1-128 letters, digits, '-', '_', '.' (not '.' or '..'; roles are exact names, not patterns)",
            grantline_proto::audit::event::excerpt(role, 80)
        ));
    }
    Ok(())
}

/// A Vault policy name as Vault itself stores it: trimmed and lower-cased.
pub fn vault_policy_name(name: &str) -> String {
    name.trim().to_lowercase()
}

/// The longest TTL any rule may grant: Grantline issues short-lived credentials.
pub const MAX_POLICY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

impl Policy {
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError::Toml(e.to_string()))?;
        let mut rules = Vec::with_capacity(file.rules.len());
        for r in file.rules {
            let line = text[..r.name.span().start.min(text.len())].lines().count().max(1);
            let name = r.name.into_inner();
            let bad = |problem: String| PolicyError::Rule { rule: name.clone(), line, problem };
            if name.is_empty() {
                return Err(bad("rule name is empty".into()));
            }
            if r.allow.is_empty() {
                return Err(bad("has no [[rule.allow]] entries, so it allows nothing".into()));
            }
            let mut allow = Vec::with_capacity(r.allow.len());
            for a in &r.allow {
                let kinds = a
                    .kinds
                    .iter()
                    .map(|k| Kind::parse(k).ok_or_else(|| bad(format!("unknown kind {k:?}; use {}", Kind::names()))))
                    .collect::<Result<Vec<_>, _>>()?;
                if kinds.is_empty() || a.roles.is_empty() {
                    return Err(bad("an allow entry needs at least one kind and one role".into()));
                }
                for role in &a.roles {
                    check_role(role).map_err(&bad)?;
                }
                let max_ttl = parse_ttl(&a.max_ttl).map_err(|e| bad(format!("max_ttl: {e}")))?;
                let default_ttl = match &a.default_ttl {
                    Some(t) => parse_ttl(t).map_err(|e| bad(format!("default_ttl: {e}")))?,
                    None => max_ttl.min(Duration::from_secs(600)),
                };
                if default_ttl > max_ttl {
                    return Err(bad(format!(
                        "default_ttl {} exceeds max_ttl {}",
                        a.default_ttl.as_deref().unwrap_or(""),
                        a.max_ttl
                    )));
                }
                if kinds.contains(&Kind::X509) && a.sans.is_empty() {
                    return Err(bad("allows x509 but lists no sans patterns".into()));
                }
                if kinds.iter().any(|k| matches!(k, Kind::SshUser | Kind::SshHost)) && a.principals.is_empty() {
                    return Err(bad("allows ssh but lists no principals patterns".into()));
                }
                if kinds.contains(&Kind::VaultToken) && a.vault_policies.is_empty() {
                    return Err(bad("allows vault-token but lists no vault_policies patterns".into()));
                }
                if kinds.iter().any(|k| k.is_svid()) && a.spiffe_ids.is_empty() {
                    return Err(bad("allows SVIDs but lists no spiffe_ids templates".into()));
                }
                for t in &a.spiffe_ids {
                    crate::spiffe::check_template(t).map_err(&bad)?;
                }
                if kinds.contains(&Kind::JwtSvid) && a.audiences.is_empty() {
                    return Err(bad("allows jwt-svid but lists no audiences patterns".into()));
                }
                // A path names no one: any user may copy or rename a program, or
                // mount another over its path in a namespace of their own. The
                // executable only narrows callers the kernel vouches for.
                // A unit glob (`*`, `*.scope`) names no one either: users have
                // session scopes of their own.
                let named_units = !a.units.is_empty() && a.units.iter().all(|u| !u.contains(['*', '?', '[']));
                if !a.exe.is_empty() && a.uids.is_empty() && a.gids.is_empty() && !named_units {
                    return Err(bad("matches callers by exe alone; any user can run a program under that \
                                    path's name, so also list the uids or gids, or a unit by its exact \
                                    name, that it runs as"
                        .into()));
                }
                let path = a.path.clone().unwrap_or_else(|| DEFAULT_SECRET_PATH.to_owned());
                if path.is_empty() || path.starts_with('/') || path.contains("..") {
                    return Err(bad(format!("path {path:?} is not a Vault path like \"database/creds/{{role}}\"")));
                }
                allow.push(Allow {
                    kinds,
                    roles: a.roles.clone(),
                    max_ttl,
                    default_ttl,
                    sans: a.sans.clone(),
                    principals: a.principals.clone(),
                    vault_policies: a.vault_policies.iter().map(|p| vault_policy_name(p)).collect(),
                    max_uses: a.max_uses,
                    path,
                    callers: Callers {
                        uids: a.uids.clone(),
                        gids: a.gids.clone(),
                        exe: a.exe.clone(),
                        units: a.units.clone(),
                    },
                    spiffe_ids: a.spiffe_ids.clone(),
                    audiences: a.audiences.clone(),
                });
            }
            let nodes = if r.nodes.is_empty() { vec!["*".to_owned()] } else { r.nodes.clone() };
            rules.push(Rule { name, nodes, labels: r.labels, allow });
        }
        let hash = hex::encode(Sha256::digest(text.as_bytes()));
        Ok(Self { rules, hash })
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like \"10m\": {e}"))?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    if d > MAX_POLICY_TTL {
        return Err(format!("{s} is longer than the 7-day limit on any credential"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DEV_POLICY;

    #[test]
    fn vault_policy_globs_are_lower_cased_like_vault_names() {
        let p = Policy::parse(
            "[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['vault-token']\nroles=['r']\nmax_ttl='1h'\nvault_policies=['App-*']\n",
        )
        .unwrap();
        assert_eq!(p.rules[0].allow[0].vault_policies, vec!["app-*".to_owned()]);
    }

    #[test]
    fn dev_policy_parses() {
        let p = Policy::parse(DEV_POLICY).unwrap();
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.hash.len(), 64);
    }

    #[test]
    fn bad_policies_say_what_is_wrong() {
        let cases = [
            ("[[rule]]\nname='a'\n", "allows nothing"),
            ("[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['pgp']\nroles=['r']\nmax_ttl='1h'\n", "unknown kind \"pgp\""),
            ("[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['x509']\nroles=['r']\nmax_ttl='soon'\nsans=['*']\n", "max_ttl"),
            ("[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['x509']\nroles=['r']\nmax_ttl='1h'\n", "no sans"),
            ("[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['ssh-user']\nroles=['r']\nmax_ttl='30d'\nprincipals=['*']\n", "7-day"),
            ("[[rule]]\nname='a'\nnodez=['x']\n", "unknown field"),
            ("[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['vault-token']\nroles=['r']\nmax_ttl='1h'\n", "no vault_policies"),
            ("[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['secret']\nroles=['r']\nmax_ttl='1h'\npath='../x'\n", "not a Vault path"),
            ("[[rule]\n", "TOML"),
            ("[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['x509-svid']\nroles=['r']\nmax_ttl='1h'\n", "no spiffe_ids"),
            (
                "[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['x509-svid']\nroles=['r']\nmax_ttl='1h'\nspiffe_ids=['spiffe://{trust_domain}/a']\nexe=['*/frontend']\n",
                "exe alone",
            ),
            (
                "[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['x509-svid']\nroles=['r']\nmax_ttl='1h'\nspiffe_ids=['spiffe://{trust_domain}/a']\nexe=['*/frontend']\nunits=['*.scope']\n",
                "exe alone",
            ),
            (
                "[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['x509-svid']\nroles=['r']\nmax_ttl='1h'\nspiffe_ids=['spiffe://{trust_domain}/a']\nexe=['*/frontend']\nunits=['nginx.service', '*']\n",
                "exe alone",
            ),
            (
                "[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['x509-svid']\nroles=['r']\nmax_ttl='1h'\nspiffe_ids=['spiffe://{trust_domain}/{shell}']\n",
                "{shell}",
            ),
            (
                "[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['x509-svid']\nroles=['r']\nmax_ttl='1h'\nspiffe_ids=['https://x/y']\n",
                "spiffe://",
            ),
            (
                "[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['jwt-svid']\nroles=['r']\nmax_ttl='1h'\nspiffe_ids=['spiffe://{trust_domain}/a']\n",
                "no audiences",
            ),
            // Roles are exact names: a glob never matches, a path step reaches Vault.
            ("[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['secret']\nroles=['app-*']\nmax_ttl='1h'\n", "not patterns"),
            ("[[rule]]\nname='a'\n[[rule.allow]]\nkinds=['secret']\nroles=['..']\nmax_ttl='1h'\n", "role \"..\""),
        ];
        for (text, want) in cases {
            let err = Policy::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?} gave {err:?}, wanted {want:?}");
        }
    }
}
