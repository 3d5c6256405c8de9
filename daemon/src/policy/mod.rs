//! Broker policy: which nodes may obtain which credentials, with what caps.
//! Deny by default. The file format is TOML (RFD 0001 §policy):
//!
//! ```toml
//! [[rule]]
//! name = "web"
//! nodes = ["web-*"]              # node name globs
//! labels = { env = "prod" }      # every label must match
//!
//! [[rule.allow]]
//! kinds = ["x509"]               # x509, ssh-user, ssh-host, vault-token, secret, x509-svid, jwt-svid
//! roles = ["web"]
//! max_ttl = "1h"
//! default_ttl = "10m"
//! sans = ["{node}.example.com"]  # X.509 SAN globs; {node} is the node name
//! principals = []                # SSH principal globs
//! vault_policies = []            # vault-token: Vault policy globs
//! max_uses = 10                  # vault-token: cap on num_uses
//! path = "database/creds/{role}" # secret: the leased Vault path
//! uids = [33]                    # the local caller (as the agent attested it):
//! gids = []                      #   uid or gid among these, when any is listed,
//! exe = ["/usr/sbin/nginx"]      #   executable and systemd unit globs (exe
//!                                #   only beside uids, gids or units: a path
//!                                #   alone names no one)
//! units = ["nginx.service"]
//! spiffe_ids = ["spiffe://{trust_domain}/unit/{unit}"] # SVIDs: ID templates (RFD 0011)
//! audiences = ["https://*.example.org"]                # jwt-svid: audience globs
//! ```

mod decide;
mod parse;
mod rules;

pub use decide::{decide, Allowed, Decision, NodeAttrs, PolicyRequest, SpiffeAsk};
pub use parse::{check_role, vault_policy_name, PolicyError, DEFAULT_SECRET_PATH, MAX_POLICY_TTL};
pub use rules::Policy;

pub use grantline_proto::kind::Kind;

/// The permissive policy `grantlined dev` writes: role `dev`, every kind.
pub const DEV_POLICY: &str = r#"# Grantline dev policy: every enrolled node may obtain every credential kind
# with role "dev". Never use this in production.

[[rule]]
name = "dev"
nodes = ["*"]

[[rule.allow]]
kinds = ["x509", "ssh-user", "ssh-host", "vault-token", "secret"]
roles = ["dev"]
max_ttl = "1h"
default_ttl = "10m"
sans = ["*"]
principals = ["*"]
vault_policies = ["*"]
path = "database/creds/{role}"

# SPIFFE (RFD 0011): every local caller of every node gets an SVID named
# after its systemd unit, or after its uid when it runs in no unit.
[[rule.allow]]
kinds = ["x509-svid", "jwt-svid"]
roles = ["dev", "spiffe"]
max_ttl = "1h"
default_ttl = "10m"
spiffe_ids = ["spiffe://{trust_domain}/unit/{unit}", "spiffe://{trust_domain}/uid/{uid}"]
audiences = ["*"]
"#;
