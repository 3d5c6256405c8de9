//! Identity renewal: at half-life ± 10 % (`renew::renew_at`), over the
//! connection, with the new identity checked against its receipt.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grantline_proto::clock::now_unix as now;
use grantline_proto::wire;
use grantline_proto::wire::{request::Body as Req, response::Body as Resp};

use crate::broker::call;
use crate::connection::{connection, jitter_unit};
use crate::enroll::{check_identity, key_and_csr};
use crate::renew::{backoff, renew_at};
use crate::session::{announce, Agent};
use crate::state::AgentState;

pub(crate) async fn renew_identity_loop(agent: Arc<Agent>) {
    loop {
        let (nb, na) = {
            let id = agent.identity.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            (id.not_before, id.not_after)
        };
        // An identity is long-lived and may have been loaded from disk after
        // a restart, so its lifetime counts from its not-before.
        let at = renew_at(nb, na, jitter_unit() * 2.0 - 1.0, now());
        let wait = u64::try_from(at - now()).unwrap_or(0);
        tracing::debug!(at, "identity renewal scheduled");
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let mut attempt = 0u32;
        while let Err(e) = renew_once(&agent).await {
            let replaced = agent.identity.read().map(|i| i.not_after != na).unwrap_or(false);
            if replaced {
                // Re-enrollment brought a new identity: schedule its renewal.
                break;
            }
            tracing::warn!(error = %format!("{e:#}"), "identity renewal failed; retrying");
            tokio::time::sleep(backoff(attempt, Duration::from_secs(1), Duration::from_secs(60), jitter_unit())).await;
            attempt = attempt.saturating_add(1);
        }
    }
}

async fn renew_once(agent: &Agent) -> Result<()> {
    if agent.identity.read().map(|i| i.not_after <= now()).unwrap_or(false) {
        bail!("the node identity expired; waiting for re-enrollment");
    }
    let conn = connection(agent, Duration::from_secs(30)).await.context("not connected to the broker")?;
    let (key, csr_der) = key_and_csr(&agent.config.node_name)?;
    let resp =
        call(&conn, &wire::Request { body: Some(Req::RenewIdentity(wire::RenewIdentityRequest { csr_der })) }).await?;
    let renewed = match resp.body {
        Some(Resp::RenewIdentity(r)) => r,
        Some(Resp::Error(e)) => bail!("the broker refused: {e}"),
        _ => bail!("unexpected reply to identity renewal"),
    };
    let id = renewed.identity.context("the broker sent no identity")?;
    let identity = check_identity(&key, &id.chain_der, renewed.receipt.as_ref(), &agent.trust())?;
    AgentState::save_identity(&agent.state_dir, &identity)?;
    let until = identity.not_after;
    *agent.identity.write().map_err(|_| anyhow::anyhow!("identity lock poisoned"))? = identity;
    agent.renewed.notify_one();
    tracing::info!(not_after = until, "node identity renewed");
    announce(&format!("grantline-agent identity renewed until {}", grantline_proto::clock::rfc3339(until)));
    Ok(())
}
