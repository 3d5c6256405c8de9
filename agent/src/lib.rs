//! grantline-agent as a library: enrollment, the broker connection, the local
//! socket API and the `get` client. `main` parses arguments and calls in here.
#![forbid(unsafe_code)]

pub mod broker;
pub mod config;
pub mod enroll;
pub mod get;
pub mod local;
pub mod recover;
pub mod renew;
pub mod run;
pub mod sinks;
pub mod state;
pub mod tls;

/// The default local socket path.
pub const DEFAULT_SOCKET: &str = "/run/grantline-agent/agent.sock";
