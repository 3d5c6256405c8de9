//! The grant path as a service: parse → decide → mint → audit → reply,
//! over small traits (issuer, audit sink, state store, clock, nodes), with
//! a domain error. The QUIC handler is a thin adapter that maps it to the
//! wire; unit tests drive it with the embedded issuer and a temporary
//! SQLite log, without sockets.

mod ports;
mod request;
mod service;
#[cfg(test)]
mod tests;

pub use ports::{AppendFuture, AuditSink, Clock, Nodes, SystemClock};
pub use request::check_grant_request;
pub use service::{GrantError, GrantService};
