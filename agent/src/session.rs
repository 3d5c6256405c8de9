//! A running agent's shared state: its identity and the TLS client for it,
//! the broker's pinned audit key, the connection (a watch channel the other
//! parts wait on), and the grants whose inclusion is not yet confirmed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use grantline_proto::audit::VerifierKey;
use tokio::sync::{watch, Notify};

use crate::config::AgentConfigFile;
use crate::state::{AgentConfig, Identity};

/// A grant whose inclusion in a checkpoint is not confirmed yet.
pub(crate) struct Unconfirmed {
    pub(crate) seq: u64,
    /// The key of the log that granted it (in a fleet, maybe not the
    /// pinned broker's).
    pub(crate) key: VerifierKey,
    pub(crate) leaf: grantline_proto::audit::Hash,
    pub(crate) granted: std::time::Instant,
}

pub(crate) struct Agent {
    pub(crate) state_dir: PathBuf,
    pub(crate) policy: AgentConfigFile,
    /// Set when the broker closed the connection because the node was revoked.
    pub(crate) revoked: std::sync::atomic::AtomicBool,
    pub(crate) config: AgentConfig,
    pub(crate) ca_pem: String,
    /// The broker's audit key: pinned at enrollment, moved forward when a
    /// receipt proves a rotation.
    pub(crate) audit_key: RwLock<VerifierKey>,
    /// In a fleet: the key that endorses every broker's audit key.
    pub(crate) fleet_key: Option<VerifierKey>,
    /// Every broker address to try, in order, and the one to try next: a
    /// lost or refused connection moves on to the next (RFD 0010).
    pub(crate) targets: Vec<(SocketAddr, String)>,
    pub(crate) next_target: std::sync::atomic::AtomicUsize,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) identity: RwLock<Identity>,
    /// The TLS client for the current identity, kept across reconnects so
    /// that its session tickets let the agent resume (RFD 0008).
    pub(crate) client: std::sync::Mutex<Option<(Vec<u8>, quinn::ClientConfig)>>,
    pub(crate) conn: watch::Sender<Option<quinn::Connection>>,
    pub(crate) renewed: Notify,
    pub(crate) unconfirmed: std::sync::Mutex<Vec<Unconfirmed>>,
    pub(crate) inclusion_deadline: Duration,
}

impl Agent {
    pub(crate) fn node_name(&self) -> &str {
        &self.config.node_name
    }

    pub(crate) fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub(crate) fn broker(&self) -> &str {
        &self.config.broker
    }

    pub(crate) fn join_token_file(&self) -> &Path {
        &self.policy.join_token_file
    }

    /// Takes a new identity (after re-enrollment) and reconnects with it.
    pub(crate) fn replace_identity(&self, identity: Identity, audit_key: VerifierKey) {
        *self.identity.write().unwrap_or_else(std::sync::PoisonError::into_inner) = identity;
        *self.audit_key.write().unwrap_or_else(std::sync::PoisonError::into_inner) = audit_key;
    }
}

impl Agent {
    pub(crate) fn pinned_key(&self) -> VerifierKey {
        self.audit_key.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// What receipts are checked with: the pinned key and the fleet key.
    pub(crate) fn trust(&self) -> grantline_proto::audit::receipt::Trust {
        grantline_proto::audit::receipt::Trust { pinned: self.pinned_key(), fleet: self.fleet_key.clone() }
    }

    /// The broker to connect to now.
    pub(crate) fn target(&self) -> &(SocketAddr, String) {
        let i = self.next_target.load(std::sync::atomic::Ordering::Relaxed);
        &self.targets[i % self.targets.len()]
    }

    /// Moves on to the next broker of the list.
    pub(crate) fn fail_over(&self) {
        if self.targets.len() > 1 {
            self.next_target.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Pins the key a verified receipt was signed by, after a rotation the
    /// receipt proved from the previously pinned key.
    pub(crate) fn follow_key(&self, key: &VerifierKey) {
        let mut pinned = self.audit_key.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Another broker of the fleet signs with its own key: that is no
        // rotation of the pinned log's.
        if *pinned == *key || pinned.name() != key.name() {
            return;
        }
        match grantline_proto::files::write_atomic(
            &self.state_dir.join("audit.vkey"),
            format!("{key}\n").as_bytes(),
            0o644,
        ) {
            Ok(()) => {
                tracing::info!(old = %*pinned, new = %key, "the broker rotated its audit key; following it");
                *pinned = key.clone();
            }
            Err(e) => tracing::error!(error = %e, "cannot save the broker's new audit key"),
        }
    }
}

/// Prints a progress line on stdout for supervisors and tests, flushed.
pub(crate) fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
