//! Recovery of a node whose identity expired while it could not reach the
//! broker (RFD 0006 §recovery). The agent cannot renew an expired identity,
//! so it re-enrolls under the same node name with a join token an admin
//! places in the token file (`join_token_file`, default
//! /etc/grantline/join-token):
//!
//! ```text
//! grantline token create --node NODE > /etc/grantline/join-token   # on the broker
//! ```
//!
//! The agent looks for the file on every reconnect attempt, enrolls with it,
//! removes it (tokens are single-use) and reconnects with the new identity.

use anyhow::{Context, Result};

use crate::enroll::{enroll, EnrollArgs};
use crate::session::{announce, Agent};
use crate::state::AgentState;

pub(crate) async fn reenroll(agent: &Agent) -> Result<()> {
    let path = agent.join_token_file();
    let token = match grantline_proto::files::read_bounded(path, 4096) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        Ok(_) | Err(_) => {
            anyhow::bail!(
                "the node identity expired; create a join token for node {node} on the broker ('grantline token create --node {node}') and write it to {path}",
                node = agent.node_name(),
                path = path.display()
            )
        }
    };
    let dir = agent.state_dir();
    let before = AgentState::load(dir).context("cannot read the agent state")?;
    enroll(EnrollArgs {
        broker: agent.broker().to_owned(),
        token,
        ca_file: dir.join("ca.pem"),
        state_dir: dir.to_owned(),
        name: agent.node_name().to_owned(),
    })
    .await
    .context("re-enrollment failed")?;
    // The token is spent whether or not it can be removed.
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(error = %e, path = %path.display(), "cannot remove the used join token file");
    }
    let after = AgentState::load(dir).context("cannot read the new agent state")?;
    if after.audit_key != before.audit_key {
        tracing::warn!(old = %before.audit_key, new = %after.audit_key, "the broker's audit key changed across re-enrollment");
    }
    agent.replace_identity(after.identity, after.audit_key);
    tracing::info!(node = %agent.node_name(), "re-enrolled after the identity expired");
    announce(&format!("grantline-agent re-enrolled as {}", agent.node_name()));
    Ok(())
}
