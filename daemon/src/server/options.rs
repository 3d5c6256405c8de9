//! What a broker is started with: built from `grantlined.toml` or by
//! `grantlined dev`, validated before anything binds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::policy::Policy;

use super::admission;

/// Everything needed to start a broker; built from `grantlined.toml` or by
/// `grantlined dev`, validated before anything binds.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub policy_path: PathBuf,
    /// The policy read from `policy_path` when the options were validated.
    pub policy: Policy,
    /// The audit log's origin when the log is created; later starts use the
    /// name in `audit.key`.
    pub origin: String,
    pub server_names: Vec<String>,
    pub identity_ttl: Duration,
    pub vault: Option<crate::vault::VaultConfig>,
    /// Where the log is published in the tlog-tiles layout (URL or directory).
    pub anchor: Option<String>,
    /// The admin API's Unix socket; none serves no admin API.
    pub admin: Option<AdminOptions>,
    /// Loopback address of the Prometheus `/metrics` endpoint.
    pub metrics: Option<SocketAddr>,
    /// Admission control on handshakes.
    pub limits: admission::Limits,
    /// The fleet's PostgreSQL; none keeps state in `state.db` (RFD 0010).
    pub database: Option<crate::state::PgConfig>,
}

/// Where the admin API listens and who may call it.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    pub socket: PathBuf,
    /// Members of this group may call (besides root and the broker's user).
    pub group: Option<String>,
    /// The socket file's mode; 0660 unless configured.
    pub mode: u32,
}
