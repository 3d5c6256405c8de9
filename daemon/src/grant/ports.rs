//! What the grant service needs from the world, each as a small trait: the
//! audit log it records into, the clock, and whether a node is still in.
//! (Minting is `issuer::Issuer`; leases are kept in `state::StateStore`.)

use std::future::Future;
use std::pin::Pin;

use grantline_proto::audit::Event;
use grantline_proto::wire;

use crate::audit::{AuditError, AuditLog};
use crate::registry::Registry;

/// What recording an event resolves to: its receipt, once durable.
pub type AppendFuture<'a> = Pin<Box<dyn Future<Output = Result<wire::Receipt, AuditError>> + Send + 'a>>;

/// Where every decision is recorded before its outcome leaves the broker.
pub trait AuditSink: Send + Sync {
    /// Records `event`; resolves once it is durable, with its receipt.
    fn append(&self, event: Event) -> AppendFuture<'_>;
}

impl AuditSink for AuditLog {
    fn append(&self, event: Event) -> AppendFuture<'_> {
        Box::pin(AuditLog::append(self, event))
    }
}

/// Seconds since the Unix epoch, as certificates and the log count them.
pub trait Clock: Send + Sync {
    fn now_unix(&self) -> i64;
}

/// The system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> i64 {
        grantline_proto::clock::now_unix()
    }
}

/// Whether a node may still receive what it was granted.
pub trait Nodes: Send + Sync {
    /// True when `name` is revoked or no longer enrolled.
    fn is_out(&self, name: &str) -> bool;
}

impl<C: Clone + Send + Sync> Nodes for Registry<C> {
    fn is_out(&self, name: &str) -> bool {
        Registry::is_out(self, name)
    }
}
