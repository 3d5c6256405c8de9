//! The broker's shell: a façade over one file per idea.
//!
//! - `broker`: start-up, the serving loop and the ordered shutdown
//! - `options`: what a broker is started with
//! - `shared`: the state every part shares, and its chores
//! - `quic`: the endpoint and each connection
//! - `handler`: one request of an agent, mapped to and from the wire
//! - `identity`: node identities (issue, check, the peer's certificate)
//! - `revoke`: node revocation and lease revocation
//! - `reload`: policy reload
//! - `admin`, `admin_peer`: the admin API on its Unix socket, and who calls it
//! - `admission`, `anonymous`: handshake admission control, certificate-less
//!   connections
//! - `oidc`: the trust domain's OIDC discovery document and JWKS (HTTPS)
//! - `tickets`, `provision`, `state_dir`: TLS session tickets, provisioning,
//!   the state directory

pub mod admin;
mod admin_peer;
pub mod admission;
pub(crate) mod anonymous;
mod broker;
mod closing;
mod fleet;
mod handler;
mod identity;
mod oidc;
mod options;
mod presence;
pub mod provision;
mod quic;
mod reload;
mod revoke;
mod shared;
mod state_dir;
pub mod tickets;

pub use crate::grant::check_grant_request;
pub use broker::Broker;
pub use identity::PeerNode;
pub use options::{AdminOptions, AnchorOptions, BrokerOptions, OidcOptions, SpiffeOptions, DEFAULT_ANCHOR_HEARTBEAT};
pub use state_dir::{
    check_key_files, create_fleet_key, endorse_audit_key, load_policy, lock_state_dir, KEY_FILES, MAX_POLICY_FILE,
};
