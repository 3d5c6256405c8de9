//! Policy reload (SIGHUP or the admin API): the new file is parsed off the
//! workers, audited, and only then put in force; a refused file leaves the
//! old policy in force, and says so in the log.

use std::sync::Arc;

use grantline_proto::audit::event::CallerInfo;
use grantline_proto::audit::Event;

use super::shared::Shared;
use super::state_dir::load_policy;

/// Why a policy reload was refused.
#[derive(Debug)]
pub(crate) enum ReloadError {
    /// The file does not parse or validate; the old policy stays.
    Invalid(String),
    /// The new policy could not be audited, so it was not put in force.
    NotAudited(String),
}

impl Shared {
    /// Re-reads the policy file; see `ReloadError`.
    pub(crate) async fn reload_policy(
        &self,
        admin: Option<CallerInfo>,
    ) -> Result<grantline_proto::admin::ReloadPolicyResponse, ReloadError> {
        let current = self.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        // Reading and parsing a large file is blocking work: off the workers
        // that serve agents.
        let path = self.policy_path.clone();
        let loaded = tokio::task::spawn_blocking(move || load_policy(&path))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the policy loader failed: {e}")));
        match loaded {
            Err(e) => {
                let error = format!("{e:#}");
                metrics::counter!("grantline_policy_reloads_total", "outcome" => "refused").increment(1);
                let event =
                    Event::PolicyReload { ok: false, policy: current.hash().into(), error: error.clone(), admin };
                if let Err(audit) = self.audit.append(event).await {
                    tracing::error!(error = %audit, "could not audit a refused policy reload");
                }
                tracing::warn!(%error, "policy reload refused; the old policy stays in force");
                Err(ReloadError::Invalid(format!(
                    "{error}; the policy in force is unchanged (sha256 {})",
                    current.hash()
                )))
            }
            Ok(policy) => {
                let event = Event::PolicyReload { ok: true, policy: policy.hash().into(), error: String::new(), admin };
                if let Err(e) = self.audit.append(event).await {
                    metrics::counter!("grantline_policy_reloads_total", "outcome" => "refused").increment(1);
                    return Err(ReloadError::NotAudited(format!(
                        "the new policy was not put in force because it could not be audited: {e}"
                    )));
                }
                let changed = policy.hash() != current.hash();
                let response = grantline_proto::admin::ReloadPolicyResponse {
                    policy_hash: policy.hash().into(),
                    rules: u32::try_from(policy.rule_count()).unwrap_or(u32::MAX),
                    changed,
                };
                *self.policy.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
                metrics::counter!("grantline_policy_reloads_total", "outcome" => "ok").increment(1);
                tracing::info!(hash = %response.policy_hash, changed, "policy reloaded");
                Ok(response)
            }
        }
    }
}
