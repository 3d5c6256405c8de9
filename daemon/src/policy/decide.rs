//! The policy decision: a pure function of the policy, the request and the
//! node's identity.

use std::collections::BTreeMap;
use std::time::Duration;

use wildmatch::WildMatch;

use super::{Allow, Kind, Policy, Rule};

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
    Allow { rule: String, ttl: Duration },
    Deny { reason: String },
}

pub fn decide(policy: &Policy, req: &PolicyRequest<'_>, node: &NodeAttrs) -> Decision {
    if req.names.is_empty() {
        let what = if req.kind == Kind::X509 { "SAN" } else { "principal" };
        return Decision::Deny { reason: format!("the request names no {what}") };
    }
    let mut closest: Option<String> = None;
    for rule in policy.rules.iter().filter(|r| rule_matches_node(r, node)) {
        for allow in rule.allow.iter().filter(|a| a.kinds.contains(&req.kind) && role_matches(a, req.role)) {
            match names_allowed(allow, req, node) {
                Ok(()) => {
                    let ttl = req.ttl.unwrap_or(allow.default_ttl).min(allow.max_ttl);
                    return Decision::Allow { rule: rule.name.clone(), ttl };
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
    let patterns = if req.kind == Kind::X509 { &allow.sans } else { &allow.principals };
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
"#;

    fn node(name: &str, env: &str) -> NodeAttrs {
        NodeAttrs { name: name.into(), labels: [("env".to_owned(), env.to_owned())].into() }
    }

    fn ask(kind: Kind, role: &str, ttl: Option<u64>, names: &[&str], n: &NodeAttrs) -> Decision {
        let p = Policy::parse(POLICY).unwrap();
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        decide(&p, &PolicyRequest { kind, role, ttl: ttl.map(Duration::from_secs), names: &names }, n)
    }

    #[test]
    fn allows_within_rule_and_caps_ttl() {
        let web = node("web-1", "prod");
        assert_eq!(
            ask(Kind::X509, "web", None, &["web-1.example.com"], &web),
            Decision::Allow { rule: "web".into(), ttl: Duration::from_secs(300) }
        );
        assert_eq!(
            ask(Kind::X509, "web", Some(86_400), &["a.svc.example.com"], &web),
            Decision::Allow { rule: "web".into(), ttl: Duration::from_secs(3600) }
        );
        assert_eq!(
            ask(Kind::SshUser, "ops", Some(60), &["deploy"], &web),
            Decision::Allow { rule: "ops".into(), ttl: Duration::from_secs(60) }
        );
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
        let kinds = [Kind::X509, Kind::SshUser, Kind::SshHost];
        let roles = ["web", "ops", "db", ""];
        let names = ["web-1.example.com", "x.svc.example.com", "ops", "deploy", "root", "*"];
        let nodes = [node("web-1", "prod"), node("web-1", "dev"), node("ops-1", "prod")];
        for k in kinds {
            for r in roles {
                for n in names {
                    for nd in &nodes {
                        for ttl in [None, Some(1), Some(1800), Some(7200)] {
                            if let Decision::Allow { rule, ttl: got } = ask(k, r, ttl, &[n], nd) {
                                let cap = if rule == "web" { 3600 } else { 1800 };
                                assert!(got.as_secs() <= cap);
                                if rule == "web" {
                                    assert!(nd.name.starts_with("web-") && k == Kind::X509 && r == "web");
                                    assert!(n.ends_with(".example.com") && n != "*");
                                } else {
                                    assert!(k == Kind::SshUser && r == "ops" && (n == "ops" || n == "deploy"));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
