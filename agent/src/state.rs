//! The agent's state directory:
//!
//! ```text
//! agent.json    broker address, server name, node name
//! node.key      node identity private key (0600), never sent anywhere
//! node.pem      node identity certificate and its chain
//! ca.pem        the broker's trust anchor
//! audit.vkey    the broker's audit verifier key, pinned at enrollment
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use grantline_proto::audit::VerifierKey;
use grantline_proto::files::{read_secret, write_atomic, write_secret};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentConfig {
    pub broker: String,
    pub server_name: String,
    pub node_name: String,
}

/// Everything loaded from the state directory.
pub struct AgentState {
    pub dir: PathBuf,
    pub config: AgentConfig,
    pub ca_pem: String,
    pub audit_key: VerifierKey,
    /// In a fleet: the key endorsing every broker's audit key (`fleet.vkey`).
    pub fleet_key: Option<VerifierKey>,
    pub identity: Identity,
}

#[derive(Clone)]
pub struct Identity {
    pub key_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: i64,
    pub not_after: i64,
}

impl Identity {
    pub fn from_parts(key_pem: String, chain_der: &[Vec<u8>]) -> Result<Self> {
        let chain: Vec<CertificateDer<'static>> = chain_der.iter().map(|c| CertificateDer::from(c.clone())).collect();
        let first = chain.first().context("the identity has no certificate")?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(first).context("the identity certificate does not parse")?;
        Ok(Self {
            key_pem,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            chain,
        })
    }

    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| grantline_proto::pem::encode("CERTIFICATE", c)).collect()
    }
}

impl AgentState {
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("agent.json");
        let config: AgentConfig = serde_json::from_slice(&std::fs::read(&cfg_path).with_context(|| {
            format!("cannot read {}; enroll first with 'grantline-agent enroll'", cfg_path.display())
        })?)
        .with_context(|| format!("{} is not valid", cfg_path.display()))?;
        let ca_pem = grantline_proto::files::read_bounded(&dir.join("ca.pem"), grantline_proto::files::MAX_SECRET_FILE)
            .context("cannot read ca.pem in the state directory")?;
        let vkey =
            grantline_proto::files::read_bounded(&dir.join("audit.vkey"), grantline_proto::files::MAX_SECRET_FILE)
                .context("cannot read audit.vkey in the state directory")?;
        let audit_key = VerifierKey::parse(&vkey).context("audit.vkey is not a verifier key")?;
        let key_pem = read_secret(&dir.join("node.key"))?;
        let chain_pem =
            grantline_proto::files::read_bounded(&dir.join("node.pem"), grantline_proto::files::MAX_SECRET_FILE)
                .context("cannot read node.pem")?;
        let chain: Vec<Vec<u8>> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<_, _>>()
            .context("node.pem is not PEM")?;
        let identity = Identity::from_parts(key_pem, &chain)?;
        let fleet_path = dir.join("fleet.vkey");
        let fleet_key = match fleet_path.exists() {
            false => None,
            true => Some(
                VerifierKey::parse(
                    grantline_proto::files::read_bounded(&fleet_path, grantline_proto::files::MAX_SECRET_FILE)?.trim(),
                )
                .context("fleet.vkey is not a verifier key")?,
            ),
        };
        Ok(Self { dir: dir.to_owned(), config, ca_pem, audit_key, fleet_key, identity })
    }

    /// Writes a (new) identity: key first, then certificate, each atomically.
    pub fn save_identity(dir: &Path, identity: &Identity) -> Result<()> {
        write_secret(&dir.join("node.key"), identity.key_pem.as_bytes())?;
        write_atomic(&dir.join("node.pem"), identity.chain_pem().as_bytes(), 0o644)?;
        Ok(())
    }

    pub fn save_enrollment(
        dir: &Path,
        config: &AgentConfig,
        ca_pem: &str,
        vkey: &VerifierKey,
        fleet: Option<&VerifierKey>,
        identity: &Identity,
    ) -> Result<()> {
        Self::save_identity(dir, identity)?;
        match fleet {
            Some(k) => write_atomic(&dir.join("fleet.vkey"), format!("{k}\n").as_bytes(), 0o644)?,
            None => {
                let _ = std::fs::remove_file(dir.join("fleet.vkey"));
            }
        }
        write_atomic(&dir.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join("audit.vkey"), format!("{vkey}\n").as_bytes(), 0o644)?;
        write_atomic(&dir.join("agent.json"), serde_json::to_vec_pretty(config)?.as_slice(), 0o644)?;
        Ok(())
    }
}
