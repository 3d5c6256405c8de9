//! What the Grantline broker, agent and verifier share: the wire messages, their
//! framing on QUIC streams, and the audit log's formats and checks.
//!
//! Everything here is pure: bytes in, values or errors out. Sockets, files and
//! SQLite live in the daemon and agent crates.
#![forbid(unsafe_code)]

pub mod admin_file;
pub mod audit;
pub mod clock;
pub mod exit;
pub mod files;
pub mod frame;
pub mod kind;
#[cfg(feature = "logging")]
pub mod logging;
pub mod pem;
pub mod slots;

/// Generated wire messages (`proto/grantline/v1/wire.proto`).
#[allow(clippy::all, clippy::pedantic)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/grantline.v1.rs"));
}

/// Generated admin control plane (`proto/grantline/admin/v1/admin.proto`):
/// messages, the tonic server trait and client.
#[cfg(feature = "admin")]
#[allow(clippy::all, clippy::pedantic)]
pub mod admin {
    include!(concat!(env!("OUT_DIR"), "/grantline.admin.v1.rs"));
}

/// Generated SPIFFE Workload API (`proto/spiffe/workload.proto`): messages
/// and the tonic server trait the agent implements.
#[cfg(feature = "workload")]
#[allow(clippy::all, clippy::pedantic)]
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// The common name of a fleet broker's server CA (RFD 0010): agents take a
/// broker certificate only from it or from the root itself, never from the
/// workload X.509 CA that chains to the same root.
pub const SERVER_CA_NAME: &str = "Grantline broker server CA";

/// ALPN protocol id spoken on the broker's QUIC port.
pub const ALPN: &[u8] = b"grantline/1";

/// How long an agent waits (plus full jitter up to as much again, or its
/// growing backoff if longer) after the broker refused its handshake with
/// QUIC's CONNECTION_REFUSED: the broker's admission control says it has
/// too many handshakes in flight (RFD 0008). QUIC gives a refusal no room
/// for a reason, so the wait is part of the protocol.
pub const REFUSED_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest error message a reply carries.
pub const MAX_ERROR_MESSAGE: usize = 1024;

impl wire::Error {
    /// Builds an error reply. The message is cut to [`MAX_ERROR_MESSAGE`]
    /// bytes: it may quote what a peer sent, and a reply stays small.
    pub fn new(code: wire::ErrorCode, message: impl Into<String>) -> Self {
        let retryable = matches!(code, wire::ErrorCode::Unavailable);
        Self {
            code: code as i32,
            message: audit::event::excerpt(&message.into(), MAX_ERROR_MESSAGE),
            retryable,
            retry_after_ms: if retryable { 1000 } else { 0 },
            retry_spread_ms: 0,
        }
    }
}

impl std::fmt::Display for wire::Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let code = wire::ErrorCode::try_from(self.code).map(|c| c.as_str_name()).unwrap_or("UNKNOWN");
        write!(f, "{code}: {}", self.message)?;
        if self.retryable {
            write!(f, " (retryable, after {} ms)", self.retry_after_ms)?;
        }
        Ok(())
    }
}

impl std::error::Error for wire::Error {}
