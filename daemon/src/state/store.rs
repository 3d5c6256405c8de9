//! The state store's contract and the records it keeps.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use anyhow::Result;

/// What a store's operation resolves to.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;
/// Decides, before a join token is spent, whether this request may use
/// what it grants.
pub type Accept<'a> = Box<dyn FnOnce(&Redeemed) -> Result<(), TokenError> + Send + 'a>;
/// What redeeming a join token resolves to.
pub type TokenFuture<'a> = Pin<Box<dyn Future<Output = Result<Redeemed, TokenError>> + Send + 'a>>;

/// Where the broker keeps what changes: join tokens, nodes, leases. Every
/// write is durable when its future resolves.
pub trait StateStore: Send + Sync {
    /// Creates a single-use join token, optionally pinned to `node`.
    fn create_token<'a>(
        &'a self,
        node: Option<&'a str>,
        labels: &'a BTreeMap<String, String>,
        ttl: Duration,
        now: i64,
    ) -> StoreFuture<'a, NewToken>;
    /// Withdraws a token that was never used (its creation was not audited).
    fn delete_token<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()>;
    /// Spends `token` once, for `used_by`. `accept` sees what the token
    /// grants first and may refuse; the token then stays unused.
    fn redeem_token<'a>(&'a self, token: &'a str, used_by: &'a str, now: i64, accept: Accept<'a>) -> TokenFuture<'a>;
    /// Records a node's identity, replacing only what `replace` allows;
    /// never clears a revocation. The check is made by the store, so it
    /// holds across a fleet of brokers writing at once.
    fn upsert_node<'a>(&'a self, node: &'a NodeRecord, replace: Replace<'a>, now: i64) -> StoreFuture<'a, Upsert>;
    /// Notes that a connection used the node's current identity `serial`:
    /// from then on only that identity renews (anywhere in a fleet). False
    /// if `serial` is no longer the node's current identity. A broker's own
    /// store keeps this in memory (the registry) and answers true.
    fn mark_current_seen<'a>(&'a self, name: &'a str, serial: &'a str) -> StoreFuture<'a, bool> {
        let _ = (name, serial);
        Box::pin(std::future::ready(Ok(true)))
    }
    /// Marks `name` revoked; false if it was already revoked or is unknown.
    fn revoke_node<'a>(&'a self, name: &'a str, now: i64) -> StoreFuture<'a, bool>;
    /// Saves when nodes were last heard from, in one batch.
    fn save_last_seen(&self, seen: Vec<(String, i64)>) -> StoreFuture<'static, ()>;
    /// Every enrolled node, revoked ones included.
    fn nodes(&self) -> StoreFuture<'static, Vec<NodeRecord>>;
    /// Keeps a lease (or token accessor) so a revocation can revoke it.
    fn record_lease<'a>(&'a self, lease: &'a LeaseRecord) -> StoreFuture<'a, ()>;
    /// The unrevoked lease `lease_id`, if this broker granted it.
    fn lease<'a>(&'a self, lease_id: &'a str) -> StoreFuture<'a, Option<LeaseRecord>>;
    /// A node's leases that are neither revoked nor expired at `now`.
    fn live_leases<'a>(&'a self, node: &'a str, now: i64) -> StoreFuture<'a, Vec<LeaseRecord>>;
    /// Marks a lease revoked.
    fn mark_lease_revoked<'a>(&'a self, lease_id: &'a str, now: i64) -> StoreFuture<'a, ()>;

    /// Whether this broker's copy of the node records may still be trusted
    /// for grants. A store shared by a fleet answers no once its change
    /// feed has been silent past its staleness bound (a revocation made
    /// elsewhere could be missed); a broker's own store always answers yes.
    fn fresh(&self) -> Result<(), String> {
        Ok(())
    }

    /// Records which nodes connected to this broker (`here`) and which
    /// left (`gone`), for `nodes list` on any broker of a fleet. A broker's
    /// own store knows its connections from memory and keeps nothing.
    fn save_presence(&self, here: Vec<String>, gone: Vec<String>) -> StoreFuture<'static, ()> {
        let _ = (here, gone);
        Box::pin(std::future::ready(Ok(())))
    }

    /// Where each connected node is connected, (node, broker), counting
    /// only brokers that are alive; empty for a broker's own store.
    fn presence(&self) -> StoreFuture<'static, Vec<(String, String)>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
}

/// Which stored identity of a node a write may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace<'a> {
    /// None: the name must be new (an enrollment with an unpinned token).
    Nothing,
    /// Any unrevoked one (an enrollment with a token pinned to the name).
    Any,
    /// The identity with this serial, or the previous one while the
    /// current has not been used (a renewal from it).
    From(&'a str),
}

impl<'a> Replace<'a> {
    /// The two parameters both stores' upserts read: a mode and a serial.
    pub(super) fn sql(self) -> (&'static str, &'a str) {
        match self {
            Replace::Nothing => ("nothing", ""),
            Replace::Any => ("any", ""),
            Replace::From(serial) => ("from", serial),
        }
    }
}

/// What a node write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    /// Stored, with the record's new version.
    Stored(i64),
    /// The node is revoked; nothing changed.
    Revoked,
    /// The stored identity is not one `Replace` allowed; nothing changed.
    Conflict,
}

/// A join token as handed to an admin: `glt1.<id>.<secret>`. Only the SHA-256
/// of the secret is stored.
pub struct NewToken {
    pub id: String,
    pub token: String,
    pub expires_at: i64,
}

/// What a redeemed token grants.
#[derive(Debug, Clone)]
pub struct Redeemed {
    pub id: String,
    pub node: Option<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("join token is malformed; it looks like glt1.<id>.<secret>")]
    Malformed,
    #[error("join token {0} is unknown; create one with 'grantline token create'")]
    Unknown(String),
    #[error("join token {0} was already used; tokens are single-use, create a new one with 'grantline token create'")]
    Used(String),
    #[error("join token {id} expired at {at}; create a new one with 'grantline token create'")]
    Expired { id: String, at: String },
    #[error("join token store failed: {0}")]
    Store(String),
    /// The token is sound but may not be used for this request; it stays unused.
    #[error("{0}")]
    Refused(String),
    /// The node the token would enroll has been revoked; the token stays unused.
    #[error("node {0} has been revoked and cannot enroll again")]
    NodeRevoked(String),
}

/// Why an identity no longer speaks for its node, for the peer to read.
pub fn replaced_identity(node: &str, serial: &str) -> String {
    format!(
        "this identity of node {node} (serial {serial}) was replaced when the node was enrolled again; \
         enroll this agent again with a token pinned to the node"
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The current identity certificate's serial, hex.
    pub serial: String,
    /// The serial of the identity the last renewal replaced ("" after an
    /// enrollment): a connection made with it may finish its requests.
    pub previous_serial: String,
    /// Whether a connection has authenticated with the current identity
    /// (memory only; a broker that starts assumes so). Until then a renewal
    /// may still come from the previous identity (its reply may have been
    /// lost); after, only the current one renews.
    pub current_seen: bool,
    pub not_after: i64,
    pub revoked: bool,
    /// When it was revoked (0: not revoked).
    pub revoked_at: i64,
    /// When the broker last heard from it (0: never).
    pub last_seen: i64,
    /// Orders the changes of a record shared by a fleet (0 in a broker's
    /// own store): a copy never replaces a newer one.
    pub version: i64,
}

impl NodeRecord {
    /// Whether an identity with `serial` speaks for this node: its current
    /// one, or the one its last renewal replaced. A re-enrollment shuts out
    /// every older one.
    pub fn speaks_for(&self, serial: &str) -> bool {
        serial == self.serial || serial == self.previous_serial
    }
}

/// A Vault lease the broker handed out, kept so it can be revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub lease_id: String,
    pub node: String,
    pub fingerprint: String,
    pub expires_at: i64,
}
