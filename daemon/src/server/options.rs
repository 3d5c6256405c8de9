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
    /// Where the log is published in the tlog-tiles layout.
    pub anchor: Option<AnchorOptions>,
    /// The admin API's Unix socket; none serves no admin API.
    pub admin: Option<AdminOptions>,
    /// Loopback address of the Prometheus `/metrics` endpoint.
    pub metrics: Option<SocketAddr>,
    /// Admission control on handshakes.
    pub limits: admission::Limits,
    /// The fleet's PostgreSQL; none keeps state in `state.db` (RFD 0010).
    pub database: Option<crate::state::PgConfig>,
    /// The SPIFFE trust domain (RFD 0011); none issues no SVIDs.
    pub spiffe: Option<SpiffeOptions>,
}

#[derive(Debug, Clone)]
pub struct SpiffeOptions {
    pub trust_domain: String,
    pub oidc: Option<OidcOptions>,
}

/// The OIDC discovery endpoint (HTTPS).
#[derive(Debug, Clone)]
pub struct OidcOptions {
    pub listen: SocketAddr,
    /// None: `https://<listen address>` once bound (`grantlined dev`).
    pub issuer: Option<String>,
    /// Certificate chain and key files; none: one from the broker's root.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Where and how the log is published (RFD 0005; a fleet's brokers share
/// one anchor, each under its origin's prefix, RFD 0010).
#[derive(Debug, Clone)]
pub struct AnchorOptions {
    /// A directory, or a `file://`, `s3://`, `gs://` or `az://` URL.
    pub location: String,
    pub access: crate::audit::anchor::Access,
    /// How often an unchanged checkpoint is written again.
    pub heartbeat: Duration,
}

impl AnchorOptions {
    /// A local directory, as `grantlined dev` and the default use.
    pub fn directory(dir: &std::path::Path) -> Self {
        Self { location: dir.display().to_string(), access: Default::default(), heartbeat: DEFAULT_ANCHOR_HEARTBEAT }
    }
}

/// How often an unchanged checkpoint is written to the anchor again.
pub const DEFAULT_ANCHOR_HEARTBEAT: Duration = Duration::from_secs(60);

/// Where the admin API listens and who may call it.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    pub socket: PathBuf,
    /// Members of this group may call (besides root and the broker's user).
    pub group: Option<String>,
    /// The socket file's mode; 0660 unless configured.
    pub mode: u32,
}
