//! Inclusion checks: every receipt is checked against the pinned audit key
//! and the credential's fingerprint, then proved included in a signed
//! checkpoint within the deadline, or reported.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grantline_proto::audit::event::{certificate_fingerprint, vault_fingerprint};
use grantline_proto::audit::VerifierKey;
use grantline_proto::wire;
use grantline_proto::wire::{request::Body as Req, response::Body as Resp};

use crate::broker::call;
use crate::connection::connection;
use crate::session::{announce, Agent, Unconfirmed};

/// The SHA-256 fingerprint the broker recorded for a granted credential.
pub fn credential_fingerprint(gr: &wire::GrantResponse) -> Result<String> {
    if !gr.lease_id.is_empty() {
        return Ok(vault_fingerprint("lease", &gr.lease_id));
    }
    if !gr.token_accessor.is_empty() {
        return Ok(vault_fingerprint("token-accessor", &gr.token_accessor));
    }
    if !gr.jwt_svid.is_empty() {
        return Ok(grantline_proto::audit::event::token_fingerprint(&gr.jwt_svid));
    }
    if !gr.ssh_certificate.is_empty() {
        let cert = ssh_key::Certificate::from_openssh(&gr.ssh_certificate).context("SSH certificate does not parse")?;
        return Ok(certificate_fingerprint(&cert.to_bytes()?));
    }
    let der = rustls_pemfile::certs(&mut gr.cert_pem.as_bytes()).next().context("no certificate in the reply")??;
    Ok(certificate_fingerprint(&der))
}

pub(crate) fn check_grant_receipt(agent: &Agent, gr: &wire::GrantResponse) -> Result<u64> {
    let fp = credential_fingerprint(gr)?;
    let checked = agent.trust().check_grant(gr.receipt.as_ref(), &fp)?;
    agent.follow_key(&checked.key);
    if let Some(r) = &gr.receipt {
        let leaf = grantline_proto::audit::entry::leaf_hash(&r.entry);
        let mut pending = agent.unconfirmed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pending.push(Unconfirmed { seq: checked.seq, key: checked.key, leaf, granted: std::time::Instant::now() });
    }
    Ok(checked.seq)
}

/// Confirms that every grant the agent received is in a checkpoint signed by
/// the broker's audit key, with an inclusion proof; reports those that are
/// not within the deadline (a broker that hands out credentials it does not
/// log, or a log that was cut).
pub(crate) async fn confirm_inclusion_loop(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let due: Vec<(u64, VerifierKey, grantline_proto::audit::Hash, std::time::Instant)> = {
            let pending = agent.unconfirmed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            pending
                .iter()
                .filter(|u| u.granted.elapsed() >= Duration::from_secs(1))
                .map(|u| (u.seq, u.key.clone(), u.leaf, u.granted))
                .collect()
        };
        for (seq, key, leaf, granted) in due {
            // Bounded, so a broker that stopped answering cannot hold the
            // report past the deadline.
            let outcome =
                match tokio::time::timeout(Duration::from_secs(3), prove_included(&agent, seq, &key, &leaf)).await {
                    Ok(r) => r,
                    Err(_) => Err(anyhow::anyhow!("the broker did not answer the proof request within 3 s")),
                };
            let settled = match &outcome {
                Ok(size) => {
                    announce(&format!("grantline-agent confirmed seq {seq} in checkpoint of size {size}"));
                    true
                }
                Err(e) if granted.elapsed() >= agent.inclusion_deadline => {
                    tracing::error!(seq, error = %format!("{e:#}"), "a grant was not proved included in the audit log in time");
                    announce(&format!("grantline-agent inclusion missing for seq {seq}: {e:#}"));
                    true
                }
                Err(_) => false,
            };
            if settled {
                agent
                    .unconfirmed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .retain(|u| u.seq != seq || u.key != key);
            }
        }
    }
}

/// Asks the connected broker to prove entry `seq` of the log of `key`; a
/// broker of the fleet proves only its own log, so a grant of a broker the
/// agent has since left is proved once it is back (or reported late).
async fn prove_included(
    agent: &Agent,
    seq: u64,
    key: &VerifierKey,
    leaf: &grantline_proto::audit::Hash,
) -> Result<u64> {
    let conn = connection(agent, Duration::from_secs(2)).await.context("not connected to the broker")?;
    let resp = call(&conn, &wire::Request { body: Some(Req::Prove(wire::ProveRequest { index: seq })) }).await?;
    let text = match resp.body {
        Some(Resp::Prove(p)) => p.tlog_proof,
        Some(Resp::Error(e)) => bail!("the broker did not prove it: {e}"),
        _ => bail!("unexpected reply to a proof request"),
    };
    let proof = grantline_proto::audit::checkpoint::InclusionReceipt::parse(&text)?;
    if proof.index != seq {
        bail!("the broker proved entry {} instead of {seq}", proof.index);
    }
    Ok(proof.verify(leaf, std::slice::from_ref(key))?.size)
}
