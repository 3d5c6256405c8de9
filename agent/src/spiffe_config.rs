//! agent.toml's `[spiffe]` section (RFD 0011): where the SPIFFE socket is
//! and what it answers under which names.
//!
//! ```toml
//! [spiffe]
//! socket = "/run/grantline-agent/spiffe.sock"  # SPIFFE_ENDPOINT_SOCKET=unix://…
//! socket_mode = "0666"        # who may connect; the broker's policy decides the IDs
//! role = "spiffe"             # the role SVID requests name in the broker's policy
//! sds_certificate = "default" # Envoy SDS resource names
//! sds_bundle = "ROOTCA"
//! broker_requests_per_second = 10  # new SVIDs asked of the broker, per local user
//! ```

use std::path::PathBuf;

use serde::Deserialize;

/// The SPIFFE socket's default path.
pub const DEFAULT_SPIFFE_SOCKET: &str = "/run/grantline-agent/spiffe.sock";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpiffeFile {
    pub socket: Option<PathBuf>,
    pub socket_mode: Option<String>,
    pub role: Option<String>,
    pub sds_certificate: Option<String>,
    pub sds_bundle: Option<String>,
    pub broker_requests_per_second: Option<u32>,
}

/// The resource names Envoy SDS serves the certificate and the bundle under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SdsNames {
    pub certificate: String,
    pub bundle: String,
}

impl Default for SdsNames {
    fn default() -> Self {
        Self { certificate: "default".into(), bundle: "ROOTCA".into() }
    }
}

/// The SPIFFE socket's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeSettings {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub role: String,
    pub sds: SdsNames,
    /// New SVIDs (and denials) asked of the broker per second per principal
    /// (`crate::principals`).
    pub broker_requests_per_second: u32,
}

impl SpiffeSettings {
    pub fn from_file(f: SpiffeFile, mode: impl Fn(&str) -> anyhow::Result<u32>) -> anyhow::Result<Self> {
        let names = SdsNames::default();
        let settings = Self {
            socket: f.socket.unwrap_or_else(|| DEFAULT_SPIFFE_SOCKET.into()),
            socket_mode: f.socket_mode.as_deref().map(mode).transpose()?.unwrap_or(0o666),
            role: f.role.unwrap_or_else(|| "spiffe".into()),
            sds: SdsNames {
                certificate: f.sds_certificate.unwrap_or(names.certificate),
                bundle: f.sds_bundle.unwrap_or(names.bundle),
            },
            broker_requests_per_second: f.broker_requests_per_second.unwrap_or(10),
        };
        anyhow::ensure!(
            settings.broker_requests_per_second >= 1,
            "[spiffe] broker_requests_per_second must be at least 1"
        );
        anyhow::ensure!(
            settings.sds.certificate != settings.sds.bundle && !settings.sds.certificate.is_empty(),
            "[spiffe] sds_certificate and sds_bundle must be two different, non-empty names"
        );
        Ok(settings)
    }
}
