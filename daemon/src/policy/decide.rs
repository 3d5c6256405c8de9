//! The policy decision: a pure function of the policy, the request and the
//! node's identity.

use std::collections::BTreeMap;
use std::time::Duration;

use grantline_proto::kind::Kind;
use wildmatch::WildMatch;

use super::rules::{Allow, Policy, Rule};

/// What policy knows about the requesting node (from its identity certificate
/// and enrollment record, never from the request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAttrs {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct PolicyRequest<'a> {
    pub kind: Kind,
    pub role: &'a str,
    /// None: the rule's default TTL.
    pub ttl: Option<Duration>,
    /// SANs (X.509) or principals (SSH) wanted.
    pub names: &'a [String],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Allowed),
    Deny { reason: String },
}

/// What an allowing rule grants: TTL already capped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub rule: String,
    pub ttl: Duration,
    /// vault-token: the rule's cap on uses, if any.
    pub max_uses: Option<u32>,
    /// secret: the leased Vault path, `{role}` filled in.
    pub path: String,
}

pub fn decide(policy: &Policy, req: &PolicyRequest<'_>, node: &NodeAttrs) -> Decision {
    if req.names.is_empty() && req.kind != Kind::DynamicSecret {
        return Decision::Deny { reason: format!("the request names no {}", req.kind.names_are()) };
    }
    let mut closest: Option<String> = None;
    for rule in policy.rules.iter().filter(|r| rule_matches_node(r, node)) {
        for allow in rule.allow.iter().filter(|a| a.kinds.contains(&req.kind) && role_matches(a, req.role)) {
            match names_allowed(allow, req, node) {
                Ok(()) => {
                    return Decision::Allow(Allowed {
                        rule: rule.name.clone(),
                        ttl: req.ttl.unwrap_or(allow.default_ttl).min(allow.max_ttl),
                        max_uses: allow.max_uses,
                        path: allow.path.replace("{role}", req.role),
                    });
                }
                Err(name) => {
                    closest.get_or_insert_with(|| {
                        format!(
                            "rule {:?} allows {} role {:?} but not the name {name:?}",
                            rule.name,
                            req.kind.name(),
                            req.role
                        )
                    });
                }
            }
        }
    }
    Decision::Deny {
        reason: closest.unwrap_or_else(|| {
            format!("no policy rule allows kind {} with role {:?} for node {:?}", req.kind.name(), req.role, node.name)
        }),
    }
}

fn rule_matches_node(rule: &Rule, node: &NodeAttrs) -> bool {
    rule.nodes.iter().any(|p| WildMatch::new(p).matches(&node.name))
        && rule.labels.iter().all(|(k, v)| node.labels.get(k) == Some(v))
}

fn role_matches(allow: &Allow, role: &str) -> bool {
    allow.roles.iter().any(|r| r == role)
}

/// Every requested name must match one of the allowed patterns; returns the
/// first name that does not.
fn names_allowed<'r>(allow: &Allow, req: &PolicyRequest<'r>, node: &NodeAttrs) -> Result<(), &'r str> {
    let patterns = match req.kind {
        Kind::X509 => &allow.sans,
        Kind::SshUser | Kind::SshHost => &allow.principals,
        Kind::VaultToken => &allow.vault_policies,
        Kind::DynamicSecret => return Ok(()),
    };
    let patterns: Vec<WildMatch> = patterns.iter().map(|p| WildMatch::new(&p.replace("{node}", &node.name))).collect();
    for name in req.names {
        if !patterns.iter().any(|p| p.matches(name)) {
            return Err(name);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[[rule]]
name = "web"
nodes = ["web-*"]
labels = { env = "prod" }
[[rule.allow]]
kinds = ["x509"]
roles = ["web"]
max_ttl = "1h"
default_ttl = "5m"
sans = ["{node}.example.com", "*.svc.example.com"]

[[rule]]
name = "ops"
[[rule.allow]]
kinds = ["ssh-user"]
roles = ["ops"]
max_ttl = "30m"
principals = ["ops", "deploy"]

[[rule]]
name = "apps"
nodes = ["app-*"]
[[rule.allow]]
kinds = ["vault-token", "secret"]
roles = ["readonly"]
max_ttl = "15m"
vault_policies = ["app-*"]
max_uses = 5
"#;

    fn node(name: &str, env: &str) -> NodeAttrs {
        NodeAttrs { name: name.into(), labels: [("env".to_owned(), env.to_owned())].into() }
    }

    fn allow(rule: &str, ttl: u64) -> Decision {
        Decision::Allow(Allowed {
            rule: rule.into(),
            ttl: Duration::from_secs(ttl),
            max_uses: if rule == "apps" { Some(5) } else { None },
            path: format!("database/creds/{}", if rule == "apps" { "readonly" } else { rule }),
        })
    }

    fn ask(kind: Kind, role: &str, ttl: Option<u64>, names: &[&str], n: &NodeAttrs) -> Decision {
        let p = Policy::parse(POLICY).unwrap();
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        decide(&p, &PolicyRequest { kind, role, ttl: ttl.map(Duration::from_secs), names: &names }, n)
    }

    #[test]
    fn allows_within_rule_and_caps_ttl() {
        let web = node("web-1", "prod");
        assert_eq!(ask(Kind::X509, "web", None, &["web-1.example.com"], &web), allow("web", 300));
        assert_eq!(ask(Kind::X509, "web", Some(86_400), &["a.svc.example.com"], &web), allow("web", 3600));
        assert_eq!(ask(Kind::SshUser, "ops", Some(60), &["deploy"], &web), allow("ops", 60));
        let app = node("app-1", "prod");
        assert_eq!(ask(Kind::VaultToken, "readonly", Some(7200), &["app-read"], &app), allow("apps", 900));
        assert_eq!(ask(Kind::DynamicSecret, "readonly", None, &[], &app), allow("apps", 600));
    }

    #[test]
    fn denies_by_default_with_reasons() {
        let web = node("web-1", "prod");
        let reason = |d: Decision| match d {
            Decision::Deny { reason } => reason,
            Decision::Allow { .. } => panic!("allowed"),
        };
        assert!(reason(ask(Kind::X509, "web", None, &["web-2.example.com"], &web)).contains("web-2.example.com"));
        assert!(reason(ask(Kind::X509, "db", None, &["web-1.example.com"], &web)).contains("no policy rule"));
        assert!(reason(ask(Kind::X509, "web", None, &["web-1.example.com"], &node("web-1", "dev")))
            .contains("no policy rule"));
        assert!(reason(ask(Kind::X509, "web", None, &["db-1.example.com"], &node("db-1", "prod")))
            .contains("no policy rule"));
        assert!(reason(ask(Kind::SshHost, "ops", None, &["ops"], &web)).contains("ssh-host"));
        assert!(reason(ask(Kind::SshUser, "ops", None, &["root"], &web)).contains("root"));
        assert!(reason(ask(Kind::SshUser, "ops", None, &[], &web)).contains("no principal"));
        let app = node("app-1", "prod");
        assert!(reason(ask(Kind::VaultToken, "readonly", None, &["root"], &app)).contains("\"root\""));
        assert!(reason(ask(Kind::VaultToken, "readonly", None, &[], &app)).contains("no Vault policy"));
        assert!(reason(ask(Kind::DynamicSecret, "admin", None, &[], &app)).contains("no policy rule"));
        assert!(reason(ask(Kind::DynamicSecret, "readonly", None, &[], &web)).contains("no policy rule"));
        let empty = Policy::parse("").unwrap();
        assert!(matches!(
            decide(&empty, &PolicyRequest { kind: Kind::X509, role: "x", ttl: None, names: &["a".into()] }, &web),
            Decision::Deny { .. }
        ));
    }

    /// Exhaustive over a small universe: an allow never exceeds the rule's caps,
    /// and every allowed name matches one of the rule's patterns.
    #[test]
    fn allow_never_exceeds_caps() {
        let kinds = [Kind::X509, Kind::SshUser, Kind::SshHost, Kind::VaultToken, Kind::DynamicSecret];
        let roles = ["web", "ops", "db", ""];
        let names = ["web-1.example.com", "x.svc.example.com", "ops", "deploy", "root", "*", "app-read"];
        let nodes = [node("web-1", "prod"), node("web-1", "dev"), node("ops-1", "prod"), node("app-1", "prod")];
        for k in kinds {
            for r in roles {
                for n in names {
                    for nd in &nodes {
                        for ttl in [None, Some(1), Some(1800), Some(7200)] {
                            if let Decision::Allow(a) = ask(k, r, ttl, &[n], nd) {
                                let cap = match a.rule.as_str() {
                                    "web" => 3600,
                                    "ops" => 1800,
                                    _ => 900,
                                };
                                assert!(a.ttl.as_secs() <= cap);
                                match a.rule.as_str() {
                                    "web" => {
                                        assert!(nd.name.starts_with("web-") && k == Kind::X509 && r == "web");
                                        assert!(n.ends_with(".example.com") && n != "*");
                                    }
                                    "ops" => assert!(k == Kind::SshUser && r == "ops" && (n == "ops" || n == "deploy")),
                                    _ => {
                                        assert!(nd.name.starts_with("app-") && r == "readonly");
                                        assert!(
                                            k == Kind::DynamicSecret
                                                || (k == Kind::VaultToken && n.starts_with("app-"))
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
