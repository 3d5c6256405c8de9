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
}

impl Policy {
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }
}
