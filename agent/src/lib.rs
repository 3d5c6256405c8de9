//! grantline-agent as a library: enrollment, the broker connection, the local
//! socket API and the `get` client. `main` parses arguments and calls in here.
#![forbid(unsafe_code)]

pub mod broker;
mod broker_cert;
mod client;
pub mod config;
pub mod connection;
pub mod credentials;
pub mod enroll;
pub mod get;
pub mod h2_authority;
mod inclusion;
mod jwt_cache;
pub mod local;
mod local_server;
pub mod principals;
pub mod recover;
pub mod renew;
mod renewal;
pub mod run;
mod sds;
mod session;
pub mod sinks;
pub mod spiffe_config;
mod spiffe_socket;
pub mod state;
mod svid;
mod svid_budget;
mod svids;
pub mod tls;
mod workload_api;

/// The default local socket path.
pub const DEFAULT_SOCKET: &str = "/run/grantline-agent/agent.sock";
