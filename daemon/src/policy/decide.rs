//! The policy decision: a pure function of the policy, the request and the
//! node's identity.

use std::collections::BTreeMap;
use std::time::Duration;

use grantline_proto::audit::event::CallerInfo;
use grantline_proto::kind::Kind;
use wildmatch::WildMatch;

use super::rules::{Allow, Callers, Policy, Rule};

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
    /// SANs (X.509), principals (SSH), Vault policies or audiences
    /// (JWT-SVID) wanted.
    pub names: &'a [String],
    /// The local caller the agent attested, if the request came through one.
    pub caller: Option<&'a CallerInfo>,
    /// SVIDs: the broker's trust domain and the SPIFFE ID asked for (empty:
    /// the first the rule's templates give).
    pub spiffe: Option<SpiffeAsk<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct SpiffeAsk<'a> {
    pub trust_domain: &'a str,
    pub spiffe_id: &'a str,
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
    /// SVIDs: the SPIFFE ID to issue.
    pub spiffe_id: String,
}

pub fn decide(policy: &Policy, req: &PolicyRequest<'_>, node: &NodeAttrs) -> Decision {
    if req.names.is_empty() && !matches!(req.kind, Kind::DynamicSecret | Kind::X509Svid) {
        return Decision::Deny { reason: format!("the request names no {}", req.kind.names_are()) };
    }
    let mut closest: Option<String> = None;
    for rule in policy.rules.iter().filter(|r| rule_matches_node(r, node)) {
        let for_request = |a: &&Allow| a.kinds.contains(&req.kind) && role_matches(a, req.role);
        for allow in rule.allow.iter().filter(for_request).filter(|a| callers_match(&a.callers, req.caller)) {
            let spiffe_id = match spiffe_id(allow, req, node) {
                Ok(id) => id,
                Err(why) => {
                    closest
                        .get_or_insert_with(|| format!("rule {:?} gives this caller no SPIFFE ID: {why}", rule.name));
                    continue;
                }
            };
            match names_allowed(allow, req, node) {
                Ok(()) => {
                    return Decision::Allow(Allowed {
                        rule: rule.name.clone(),
                        ttl: req.ttl.unwrap_or(allow.default_ttl).min(allow.max_ttl),
                        max_uses: allow.max_uses,
                        path: allow.path.replace("{role}", req.role),
                        spiffe_id,
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

/// An allow entry that names callers holds only for a request with a
/// caller among them.
fn callers_match(callers: &Callers, caller: Option<&CallerInfo>) -> bool {
    if callers.any() {
        return true;
    }
    let Some(c) = caller else { return false };
    let glob = |patterns: &[String], v: &str| patterns.iter().any(|p| WildMatch::new(p).matches(v));
    let who = (callers.uids.is_empty() && callers.gids.is_empty())
        || callers.uids.contains(&c.uid)
        || callers.gids.contains(&c.gid);
    who && (callers.exe.is_empty() || glob(&callers.exe, &c.exe))
        && (callers.units.is_empty() || glob(&callers.units, &c.unit))
}

/// The SPIFFE ID an SVID request gets from this entry: the one asked for if
/// a template gives it, else the first a template gives. Empty for other
/// kinds.
fn spiffe_id(allow: &Allow, req: &PolicyRequest<'_>, node: &NodeAttrs) -> Result<String, String> {
    if !req.kind.is_svid() {
        return Ok(String::new());
    }
    let (Some(ask), Some(caller)) = (req.spiffe, req.caller) else {
        return Err("SVIDs are issued to a local caller of a node's agent, in a broker with a trust_domain".into());
    };
    let mut first_error = None;
    for t in &allow.spiffe_ids {
        match crate::spiffe::expand(t, ask.trust_domain, &node.name, caller) {
            Ok(id) if ask.spiffe_id.is_empty() || id == ask.spiffe_id => return Ok(id),
            Ok(_) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(match (ask.spiffe_id.is_empty(), first_error) {
        (false, _) => format!("no template gives {:?}", grantline_proto::audit::event::excerpt(ask.spiffe_id, 120)),
        (true, Some(e)) => e,
        (true, None) => "the rule lists no spiffe_ids".into(),
    })
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
        Kind::JwtSvid => &allow.audiences,
        Kind::DynamicSecret | Kind::X509Svid => return Ok(()),
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
            spiffe_id: String::new(),
        })
    }

    fn ask(kind: Kind, role: &str, ttl: Option<u64>, names: &[&str], n: &NodeAttrs) -> Decision {
        let p = Policy::parse(POLICY).unwrap();
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let ttl = ttl.map(Duration::from_secs);
        decide(&p, &PolicyRequest { kind, role, ttl, names: &names, caller: None, spiffe: None }, n)
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
            decide(
                &empty,
                &PolicyRequest {
                    kind: Kind::X509,
                    role: "x",
                    ttl: None,
                    names: &["a".into()],
                    caller: None,
                    spiffe: None
                },
                &web
            ),
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

    const SPIFFE: &str = r#"
[[rule]]
name = "web"
nodes = ["web-*"]
[[rule.allow]]
kinds = ["x509-svid", "jwt-svid"]
roles = ["spiffe"]
max_ttl = "1h"
units = ["nginx.service", "envoy.service"]
spiffe_ids = ["spiffe://{trust_domain}/web/{unit}", "spiffe://{trust_domain}/node/{node}"]
audiences = ["https://*.example.org"]
"#;

    fn svid(kind: Kind, unit: &str, want: &str, names: &[&str]) -> Decision {
        let p = Policy::parse(SPIFFE).unwrap();
        let caller = CallerInfo { uid: 33, gid: 33, pid: 9, exe: "/usr/sbin/nginx".into(), unit: unit.into() };
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let spiffe = Some(SpiffeAsk { trust_domain: "example.org", spiffe_id: want });
        let ask = PolicyRequest { kind, role: "spiffe", ttl: None, names: &names, caller: Some(&caller), spiffe };
        decide(&p, &ask, &node("web-1", "prod"))
    }

    fn id_of(d: Decision) -> Result<String, String> {
        match d {
            Decision::Allow(a) => Ok(a.spiffe_id),
            Decision::Deny { reason } => Err(reason),
        }
    }

    #[test]
    fn svids_go_to_the_callers_policy_names_and_only_to_them() {
        let web = "spiffe://example.org/web/nginx.service".to_owned();
        assert_eq!(id_of(svid(Kind::X509Svid, "nginx.service", "", &[])), Ok(web.clone()));
        assert_eq!(id_of(svid(Kind::JwtSvid, "nginx.service", "", &["https://a.example.org"])), Ok(web));
        // The second template, when asked for.
        let node_id = "spiffe://example.org/node/web-1";
        assert_eq!(id_of(svid(Kind::X509Svid, "envoy.service", node_id, &[])).as_deref(), Ok(node_id));
        // A caller no entry names, an ID no template gives, a foreign audience.
        assert!(id_of(svid(Kind::X509Svid, "sshd.service", "", &[])).unwrap_err().contains("no policy rule"));
        let other = id_of(svid(Kind::X509Svid, "nginx.service", "spiffe://example.org/admin", &[])).unwrap_err();
        assert!(other.contains("no template gives"), "{other}");
        let aud = id_of(svid(Kind::JwtSvid, "nginx.service", "", &["https://evil.test"])).unwrap_err();
        assert!(aud.contains("evil.test"), "{aud}");
        assert!(id_of(svid(Kind::JwtSvid, "nginx.service", "", &[])).unwrap_err().contains("no SPIFFE ID"));
        // No trust domain or no caller: nothing.
        let p = Policy::parse(SPIFFE).unwrap();
        let ask =
            PolicyRequest { kind: Kind::X509Svid, role: "spiffe", ttl: None, names: &[], caller: None, spiffe: None };
        assert!(matches!(decide(&p, &ask, &node("web-1", "prod")), Decision::Deny { .. }));
    }
}
