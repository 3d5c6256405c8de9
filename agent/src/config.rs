//! `/etc/grantline/agent.toml`: which local callers may ask for what, and the
//! credential sinks the agent keeps fresh on its own. Parsing and the caller
//! policy are pure; `run` does the I/O.
//!
//! ```toml
//! join_token_file = "/etc/grantline/join-token"   # re-enrollment, see RFD 0006
//!
//! [[allow]]                 # a caller matching every listed field may ask
//! name = "nginx"
//! users = ["www-data"]      # or uids = [33]
//! groups = ["ssl-cert"]     # or gids; matches the primary group
//! exe = ["/usr/sbin/nginx"] # the caller's executable (globs)
//! units = ["nginx.service"] # the caller's systemd unit (globs)
//! kinds = ["x509"]
//! roles = ["web"]
//!
//! [[sink]]                  # a credential the agent obtains and renews itself
//! name = "nginx-tls"
//! kind = "x509"
//! role = "web"
//! ttl = "1h"
//! sans = ["web-1.example.com"]
//! cert = "/etc/nginx/tls/cert.pem"
//! key = "/etc/nginx/tls/key.pem"
//! ca = "/etc/nginx/tls/ca.pem"
//! owner = "www-data"
//! group = "www-data"
//! mode = "0640"
//! reload = "systemctl reload nginx"
//! # writable_dir = true     # only if others may write the files' directory
//!
//! [[sink]]                  # SPIFFE SVIDs as files (spiffe-helper's names)
//! name = "svid"
//! kind = "x509-svid"        # or "jwt-svid" with `token` and `audiences`
//! role = "spiffe"
//! cert = "/run/spiffe/svid.pem"
//! key = "/run/spiffe/svid_key.pem"
//! ca = "/run/spiffe/svid_bundle.pem"
//! ```
//!
//! `[spiffe]` configures the SPIFFE socket: see `spiffe_config`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grantline_proto::kind::Kind;
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/grantline/agent.toml";
pub const DEFAULT_JOIN_TOKEN_FILE: &str = "/etc/grantline/join-token";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    join_token_file: Option<PathBuf>,
    /// Octal mode of the local socket; default "0666" (the policy decides).
    socket_mode: Option<String>,
    #[serde(default)]
    allow: Vec<AllowFile>,
    #[serde(default)]
    sink: Vec<SinkFile>,
    spiffe: Option<crate::spiffe_config::SpiffeFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowFile {
    name: String,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    gids: Vec<u32>,
    #[serde(default)]
    exe: Vec<String>,
    #[serde(default)]
    units: Vec<String>,
    kinds: Vec<String>,
    roles: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkFile {
    name: String,
    kind: String,
    role: String,
    ttl: Option<String>,
    #[serde(default)]
    sans: Vec<String>,
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    vault_policies: Vec<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    token: Option<PathBuf>,
    secret: Option<PathBuf>,
    owner: Option<String>,
    group: Option<String>,
    mode: Option<String>,
    reload: Option<String>,
    /// jwt-svid: the audiences of the token.
    #[serde(default)]
    audiences: Vec<String>,
    /// Write even into a directory others can write (see `sinks::check_dir`).
    #[serde(default)]
    writable_dir: bool,
}

/// The local process asking, as the kernel reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub exe: String,
    pub unit: String,
}

/// One `[[allow]]` rule, with user and group names resolved to ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    pub name: String,
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub exe: Vec<String>,
    pub units: Vec<String>,
    /// The kinds it allows; None for any ("*").
    pub kinds: Option<Vec<Kind>>,
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sink {
    pub name: String,
    pub kind: Kind,
    pub role: String,
    pub ttl: Option<Duration>,
    pub sans: Vec<String>,
    pub principals: Vec<String>,
    pub vault_policies: Vec<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub token: Option<PathBuf>,
    pub secret: Option<PathBuf>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: u32,
    pub reload: Option<String>,
    pub audiences: Vec<String>,
    pub writable_dir: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfigFile {
    pub join_token_file: PathBuf,
    pub socket_mode: u32,
    /// None: the file gave no rules, so only root and the agent's own user may ask.
    pub allow: Option<Vec<AllowRule>>,
    pub sinks: Vec<Sink>,
    /// The SPIFFE socket (RFD 0011); None serves none.
    pub spiffe: Option<crate::spiffe_config::SpiffeSettings>,
}

fn octal(what: &str, s: &str) -> Result<u32> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .with_context(|| format!("{what} {s:?} is not an octal file mode like \"0640\""))
}

/// Resolves names with `lookup` (user or group database), ids as given.
fn resolve(names: &[String], ids: &[u32], lookup: impl Fn(&str) -> Option<u32>, what: &str) -> Result<Vec<u32>> {
    let mut out = ids.to_vec();
    for n in names {
        out.push(lookup(n).with_context(|| format!("{what} {n:?} does not exist on this host"))?);
    }
    Ok(out)
}

pub fn user_id(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name).ok().flatten().map(|u| u.uid.as_raw())
}

pub fn group_id(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name).ok().flatten().map(|g| g.gid.as_raw())
}

impl AgentConfigFile {
    /// Reads the file; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Self> {
        match grantline_proto::files::read_bounded(path, 4 << 20) {
            Ok(text) => Self::parse(&text, user_id, group_id).with_context(|| format!("{} is invalid", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::parse("", user_id, group_id),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn parse(
        text: &str,
        users: impl Fn(&str) -> Option<u32> + Copy,
        groups: impl Fn(&str) -> Option<u32> + Copy,
    ) -> Result<Self> {
        let file: AgentFile = toml::from_str(text)?;
        let mut allow = Vec::new();
        for a in file.allow {
            let ctx = || format!("allow rule {:?}", a.name);
            if a.kinds.is_empty() || a.roles.is_empty() {
                bail!("allow rule {:?} needs at least one kind and one role (\"*\" for any)", a.name);
            }
            let kinds = if a.kinds.iter().any(|k| k == "*") {
                None
            } else {
                let named = a.kinds.iter().map(|k| {
                    Kind::parse(k)
                        .with_context(|| format!("allow rule {:?}: unknown kind {k:?}; use {}", a.name, Kind::names()))
                });
                Some(named.collect::<Result<Vec<Kind>>>()?)
            };
            if a.users.is_empty() && a.uids.is_empty() && a.groups.is_empty() && a.gids.is_empty() {
                bail!("allow rule {:?} names no users, uids, groups or gids; say who may ask", a.name);
            }
            allow.push(AllowRule {
                uids: resolve(&a.users, &a.uids, users, "user").with_context(ctx)?,
                gids: resolve(&a.groups, &a.gids, groups, "group").with_context(ctx)?,
                name: a.name,
                exe: a.exe,
                units: a.units,
                kinds,
                roles: a.roles,
            });
        }
        let mut sinks = Vec::new();
        for s in file.sink {
            let ctx = || format!("sink {:?}", s.name);
            let Some(kind) = Kind::parse(&s.kind) else {
                bail!("sink {:?}: unknown kind {:?}; use {}", s.name, s.kind, Kind::names());
            };
            let needs: &[(&str, bool)] = match kind {
                Kind::X509 | Kind::SshUser | Kind::SshHost => &[("cert", s.cert.is_some()), ("key", s.key.is_some())],
                Kind::VaultToken => &[("token", s.token.is_some())],
                Kind::DynamicSecret => &[("secret", s.secret.is_some())],
                // spiffe-helper's names: svid.pem, svid_key.pem, svid_bundle.pem.
                Kind::X509Svid => &[("cert", s.cert.is_some()), ("key", s.key.is_some())],
                Kind::JwtSvid => &[("token", s.token.is_some()), ("audiences", !s.audiences.is_empty())],
            };
            for (field, present) in needs {
                if !present {
                    bail!("sink {:?} of kind {} needs a `{field}` path", s.name, s.kind);
                }
            }
            if matches!(kind, Kind::SshUser | Kind::SshHost) && s.principals.is_empty() {
                bail!("sink {:?} needs principals", s.name);
            }
            if kind == Kind::VaultToken && s.vault_policies.is_empty() {
                bail!("sink {:?} needs vault_policies", s.name);
            }
            let ttl = match &s.ttl {
                Some(t) => Some(
                    humantime::parse_duration(t)
                        .with_context(|| format!("sink {:?}: ttl {t:?} is not a duration like \"1h\"", s.name))?,
                ),
                None => None,
            };
            sinks.push(Sink {
                uid: s
                    .owner
                    .as_deref()
                    .map(|o| resolve(&[o.to_owned()], &[], users, "user"))
                    .transpose()
                    .with_context(ctx)?
                    .map(|v| v[0]),
                gid: s
                    .group
                    .as_deref()
                    .map(|g| resolve(&[g.to_owned()], &[], groups, "group"))
                    .transpose()
                    .with_context(ctx)?
                    .map(|v| v[0]),
                mode: s.mode.as_deref().map(|m| octal("mode", m)).transpose().with_context(ctx)?.unwrap_or(0o600),
                name: s.name,
                kind,
                role: s.role,
                ttl,
                sans: s.sans,
                principals: s.principals,
                vault_policies: s.vault_policies,
                cert: s.cert,
                key: s.key,
                ca: s.ca,
                token: s.token,
                secret: s.secret,
                reload: s.reload,
                audiences: s.audiences,
                writable_dir: s.writable_dir,
            });
        }
        Ok(Self {
            join_token_file: file.join_token_file.unwrap_or_else(|| DEFAULT_JOIN_TOKEN_FILE.into()),
            socket_mode: file.socket_mode.as_deref().map(|m| octal("socket_mode", m)).transpose()?.unwrap_or(0o666),
            allow: (!allow.is_empty()).then_some(allow),
            sinks,
            spiffe: file
                .spiffe
                .map(|f| crate::spiffe_config::SpiffeSettings::from_file(f, |m| octal("[spiffe] socket_mode", m)))
                .transpose()?,
        })
    }

    /// Whether any rule could allow a caller with this uid and gid anything
    /// (without rules: root and `agent_uid`). Callers no rule names share a
    /// small pool of the agent's connections.
    pub fn may_ask(&self, uid: u32, gid: u32, agent_uid: u32) -> bool {
        match &self.allow {
            None => uid == 0 || uid == agent_uid,
            Some(rules) => uid == 0 || rules.iter().any(|r| r.uids.contains(&uid) || r.gids.contains(&gid)),
        }
    }

    /// Whether `caller` may ask for `kind`/`role`: the name of the rule that
    /// allows it, or why not. Without rules, root and `agent_uid` may ask.
    pub fn allows(&self, caller: &Caller, kind: Kind, role: &str, agent_uid: u32) -> Result<String, String> {
        let Some(rules) = &self.allow else {
            if caller.uid == 0 || caller.uid == agent_uid {
                return Ok("default".into());
            }
            return Err(format!(
                "uid {} may not ask this agent for credentials: without [[allow]] rules in agent.toml only root and the agent's user may",
                caller.uid
            ));
        };
        let glob = |patterns: &[String], v: &str| patterns.iter().any(|p| wildmatch::WildMatch::new(p).matches(v));
        for r in rules {
            let who = r.uids.contains(&caller.uid) || r.gids.contains(&caller.gid);
            let exe = r.exe.is_empty() || glob(&r.exe, &caller.exe);
            let unit = r.units.is_empty() || glob(&r.units, &caller.unit);
            let kind_ok = r.kinds.as_ref().is_none_or(|kinds| kinds.contains(&kind));
            if who && exe && unit && kind_ok && glob(&r.roles, role) {
                return Ok(r.name.clone());
            }
        }
        Err(format!(
            "no [[allow]] rule in agent.toml lets uid {} (gid {}, exe {:?}, unit {:?}) ask for {kind} role {role}",
            caller.uid,
            caller.gid,
            caller.exe,
            if caller.unit.is_empty() { "-" } else { caller.unit.as_str() }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(n: &str) -> Option<u32> {
        match n {
            "www-data" => Some(33),
            "root" => Some(0),
            _ => None,
        }
    }
    fn groups(n: &str) -> Option<u32> {
        (n == "ssl-cert").then_some(110)
    }

    fn caller(uid: u32, gid: u32, exe: &str, unit: &str) -> Caller {
        Caller { uid, gid, pid: 1, exe: exe.into(), unit: unit.into() }
    }

    #[test]
    fn rules_match_on_every_field_and_deny_by_default() {
        let c = AgentConfigFile::parse(
            r#"
[[allow]]
name = "nginx"
users = ["www-data"]
exe = ["/usr/sbin/nginx"]
units = ["nginx.service"]
kinds = ["x509"]
roles = ["web"]

[[allow]]
name = "certs"
groups = ["ssl-cert"]
kinds = ["*"]
roles = ["db-*"]
"#,
            users,
            groups,
        )
        .unwrap();
        let nginx = caller(33, 33, "/usr/sbin/nginx", "nginx.service");
        assert_eq!(c.allows(&nginx, Kind::X509, "web", 999), Ok("nginx".into()));
        assert!(c.allows(&nginx, Kind::SshUser, "web", 999).is_err(), "kind");
        assert!(c.allows(&nginx, Kind::X509, "db", 999).is_err(), "role");
        assert!(c.allows(&caller(33, 33, "/usr/bin/curl", "nginx.service"), Kind::X509, "web", 999).is_err(), "exe");
        assert!(c.allows(&caller(33, 33, "/usr/sbin/nginx", "cron.service"), Kind::X509, "web", 999).is_err(), "unit");
        let e = c.allows(&caller(1000, 1000, "/bin/sh", ""), Kind::X509, "web", 999).unwrap_err();
        assert!(e.contains("uid 1000"), "{e}");
        assert_eq!(c.allows(&caller(5, 110, "/x", ""), Kind::DynamicSecret, "db-ro", 999), Ok("certs".into()));
        // Root gets nothing it is not given once rules exist.
        assert!(c.allows(&caller(0, 0, "/x", ""), Kind::X509, "web", 0).is_err());
    }

    #[test]
    fn without_rules_only_root_and_the_agent_user_may_ask() {
        let c = AgentConfigFile::parse("", users, groups).unwrap();
        assert!(c.allows(&caller(0, 0, "", ""), Kind::X509, "dev", 999).is_ok());
        assert!(c.allows(&caller(999, 999, "", ""), Kind::X509, "dev", 999).is_ok());
        assert!(c.allows(&caller(65534, 65534, "", ""), Kind::X509, "dev", 999).is_err());
        assert_eq!(c.socket_mode, 0o666);
        assert_eq!(c.join_token_file, Path::new(DEFAULT_JOIN_TOKEN_FILE));
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        for (text, want) in [
            ("[[allow]]\nname='a'\nusers=['nobody-here']\nkinds=['x509']\nroles=['r']", "does not exist"),
            ("[[allow]]\nname='a'\nkinds=['x509']\nroles=['r']", "names no users"),
            ("[[allow]]\nname='a'\nuids=[1]\nkinds=['x']\nroles=['r']", "unknown kind"),
            ("[[sink]]\nname='s'\nkind='x509'\nrole='r'\ncert='/c'", "needs a `key` path"),
            ("[[sink]]\nname='s'\nkind='secret'\nrole='r'\nsecret='/s'\nmode='8'", "octal"),
            ("[[sink]]\nname='s'\nkind='secret'\nrole='r'\nsecret='/s'\nttl='soon'", "duration"),
            ("colour = 'blue'", "unknown field"),
        ] {
            let e = format!("{:#}", AgentConfigFile::parse(text, users, groups).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
        let s = AgentConfigFile::parse(
            "[[sink]]\nname='s'\nkind='x509'\nrole='r'\ncert='/c'\nkey='/k'\nowner='www-data'\ngroup='ssl-cert'\nmode='0640'",
            users,
            groups,
        )
        .unwrap();
        assert_eq!((s.sinks[0].uid, s.sinks[0].gid, s.sinks[0].mode), (Some(33), Some(110), 0o640));
    }
}
