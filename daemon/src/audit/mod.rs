//! The audit log's shell: SQLite storage and the single writer task. The
//! formats and checks are in `grantline_proto::audit`.

pub mod anchor;
pub mod prove;
pub mod store;
pub mod writer;

pub use store::{AuditReaders, AuditStore};
pub use writer::{AuditError, AuditLog};
