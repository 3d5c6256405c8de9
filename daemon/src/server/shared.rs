//! What every part of a running broker shares: its keys and issuers, the
//! audit log, the policy in force, `state.db`, the node registry, and the
//! limits; with the chores that keep them (join tokens, last-seen times,
//! checkpoint age).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use grantline_proto::audit::event::CallerInfo;
use grantline_proto::audit::{Event, VerifierKey};
use grantline_proto::clock::now_unix;
use tokio_util::task::TaskTracker;

use super::{admission, anonymous};
use crate::audit::{AuditLog, AuditReaders};
use crate::grant::GrantService;
use crate::pki::Pki;
use crate::policy::Policy;
use crate::registry::Registry;
use crate::state::StateStore;
use crate::vault::Vault;
use grantline_proto::wire;

pub(crate) struct Shared {
    pub(super) pki: Arc<Pki>,
    /// The grant path, over the issuers, the log, the state and the registry.
    pub(super) grants: GrantService,
    pub(super) vault: Option<Arc<Vault>>,
    pub(super) audit: AuditLog,
    pub(super) policy: RwLock<Arc<Policy>>,
    pub(super) policy_path: PathBuf,
    pub(super) state: Arc<dyn StateStore>,
    /// The latest checkpoint and when the broker first saw it (for its age).
    pub(super) checkpoint_seen: std::sync::Mutex<(Option<String>, std::time::Instant)>,
    /// Enrolled nodes, their live connections and last-seen times.
    pub(super) registry: Arc<Registry<quinn::Connection>>,
    /// Held while an issued identity is checked against the node's record
    /// and recorded, so that enrollments and renewals of one name cannot
    /// interleave (revocation needs no lock: it is never undone).
    pub(super) identity_commit: tokio::sync::Mutex<()>,
    /// Connections without a node identity, per address.
    pub(super) anonymous: anonymous::Anonymous,
    pub(super) identity_ttl: Duration,
    pub(super) vkey: VerifierKey,
    /// The fleet key that endorsed `vkey`, sent to enrolling agents.
    pub(super) fleet_vkey: Option<VerifierKey>,
    pub(super) requests: TaskTracker,
    pub(super) handshakes: admission::Handshakes,
    pub(super) limits: admission::Limits,
    /// Read-only connections to the audit database for proofs and admin
    /// reads, opened once, one per core (agents ask after every grant).
    pub(super) audit_reader: Arc<AuditReaders>,
    /// This broker's part in a fleet (state in PostgreSQL), if it is in one.
    pub(super) fleet: Option<super::presence::Fleet>,
}

impl Shared {
    /// Notes when the latest checkpoint first appeared.
    pub(super) fn track_checkpoint(&self) {
        let latest = self.audit.checkpoints().borrow().clone();
        let mut seen = self.checkpoint_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if latest.is_some() && seen.0 != latest {
            *seen = (latest, std::time::Instant::now());
        }
    }

    /// Gauges computed when /metrics is scraped.
    pub(super) fn refresh_gauges(&self) {
        self.track_checkpoint();
        let age = self.checkpoint_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).1.elapsed();
        metrics::gauge!("grantline_checkpoint_age_seconds").set(age.as_secs_f64());
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("grantline_audit_entries").set(*self.audit.size().borrow() as f64);
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("grantline_handshakes_in_flight").set(self.handshakes.in_flight() as f64);
    }

    /// Saves last-seen times to the state store in one batch.
    pub(super) async fn flush_last_seen(&self) {
        let seen = self.registry.take_seen();
        if seen.is_empty() {
            return;
        }
        if let Err(e) = self.state.save_last_seen(seen).await {
            tracing::warn!(error = %e, "cannot save when nodes were last seen");
        }
    }

    /// Creates a join token and audits its creation; a token whose creation
    /// is not in the log is withdrawn and never handed out.
    pub(crate) async fn issue_join_token(
        &self,
        node: Option<&str>,
        labels: BTreeMap<String, String>,
        ttl: Duration,
        admin: CallerInfo,
    ) -> Result<crate::state::NewToken, String> {
        let token = self
            .state
            .create_token(node, &labels, ttl, now_unix())
            .await
            .map_err(|e| format!("cannot store the token: {e:#}"))?;
        let event = Event::TokenCreation {
            token_id: token.id.clone(),
            node: node.unwrap_or_default().to_owned(),
            labels,
            expires_at: token.expires_at,
            admin,
        };
        if let Err(e) = self.audit.append(event).await {
            if let Err(d) = self.state.delete_token(&token.id).await {
                tracing::error!(error = %d, token = %token.id, "cannot withdraw an unaudited join token");
            }
            return Err(format!("not audited: {e}"));
        }
        tracing::info!(token = %token.id, node = node.unwrap_or_default(), "join token created");
        Ok(token)
    }
}

/// Periodic chores: noting new checkpoints (for their age), last-seen times
/// to disk. Holds only a weak handle, so it never keeps the broker's state
/// alive at shutdown.
pub(super) async fn upkeep(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_fresh = true;
    for n in 0u64.. {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else { return };
        shared.track_checkpoint();
        if let Some(fleet) = &shared.fleet {
            // Past its staleness bound a fleet broker grants nothing: its
            // agents are sent to the other brokers (once, as it goes stale).
            let fresh = shared.state.fresh();
            if let (Err(why), true) = (&fresh, was_fresh) {
                let conns = shared.registry.connections();
                tracing::error!(reason = %why, agents = conns.len(), "the fleet's state is stale here; sending agents to other brokers");
                // Spread like a restart's, so the next broker is not met by
                // every agent at once.
                let spread = admission::reconnect_spread(conns.len(), shared.limits.reconnects_per_second);
                let mut bye = wire::Error::new(wire::ErrorCode::Unavailable, why.clone());
                (bye.retryable, bye.retry_after_ms) = (true, 1000);
                bye.retry_spread_ms = u32::try_from(spread.as_millis()).unwrap_or(u32::MAX);
                for conn in &conns {
                    super::closing::close_with(conn, &bye);
                }
            }
            was_fresh = fresh.is_ok();
            fleet.report_presence(shared.registry.connected_names()).await;
        }
        if n % 30 == 29 {
            shared.flush_last_seen().await;
        }
    }
}
