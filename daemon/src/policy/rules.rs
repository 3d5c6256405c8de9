//! A policy as the broker holds it: rules of node matches and allowances,
//! already checked, and the hash of the file they came from.

use std::collections::BTreeMap;
use std::time::Duration;

use grantline_proto::kind::Kind;

#[derive(Debug, Clone)]
pub struct Policy {
    pub(super) rules: Vec<Rule>,
    /// SHA-256 of the policy file, hex: recorded with every decision.
    pub(super) hash: String,
}

#[derive(Debug, Clone)]
pub(super) struct Rule {
    pub(super) name: String,
    pub(super) nodes: Vec<String>,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) allow: Vec<Allow>,
}

#[derive(Debug, Clone)]
pub(super) struct Allow {
    pub(super) kinds: Vec<Kind>,
    pub(super) roles: Vec<String>,
    pub(super) max_ttl: Duration,
    pub(super) default_ttl: Duration,
    pub(super) sans: Vec<String>,
    pub(super) principals: Vec<String>,
    pub(super) vault_policies: Vec<String>,
    pub(super) max_uses: Option<u32>,
    pub(super) path: String,
    /// Who on the node may receive this (empty: any caller, or none).
    pub(super) callers: Callers,
    /// SVIDs: SPIFFE ID templates such as `spiffe://{trust_domain}/unit/{unit}`.
    pub(super) spiffe_ids: Vec<String>,
    /// JWT-SVIDs: audience patterns.
    pub(super) audiences: Vec<String>,
}

/// The local callers an allow entry is for, as the agent attested them:
/// a uid or gid among those listed (when any is), an executable and a
/// systemd unit matching a glob (when any is listed). All empty: any caller,
/// and requests with no caller at all.
#[derive(Debug, Clone, Default)]
pub(super) struct Callers {
    pub(super) uids: Vec<u32>,
    pub(super) gids: Vec<u32>,
    pub(super) exe: Vec<String>,
    pub(super) units: Vec<String>,
}

impl Callers {
    pub(super) fn any(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty() && self.exe.is_empty() && self.units.is_empty()
    }
}

impl Policy {
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }
}
