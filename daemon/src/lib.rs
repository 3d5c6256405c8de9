//! grantlined, the Grantline access broker, as a library: `main` parses and
//! validates, then calls into here, and tests can start a broker in-process.
// One call has no safe wrapper (SO_PEERGROUPS, `server::admin_peer`); it
// alone allows unsafe code.
#![deny(unsafe_code)]

pub mod config;
pub mod grant;
pub mod issuer;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod registry;
pub mod server;
pub mod spiffe;
pub mod state;
pub mod vault;

/// The audit log's shells live in their own crate, shared with the CLI.
pub use grantline_audit as audit;
pub use grantline_audit::verify;
