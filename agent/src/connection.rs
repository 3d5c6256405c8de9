//! The one persistent QUIC connection to the broker: kept up with backoff
//! and full jitter, honouring what the broker asks for when it closes or
//! refuses (RFD 0008), with a shut-out identity backing off to the cap.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use grantline_proto::clock::now_unix as now;
use grantline_proto::wire;
use grantline_proto::wire::ErrorCode;
use rand::Rng;

use crate::renew::backoff;
use crate::session::{announce, Agent};
use crate::state::Identity;
use crate::tls;

pub(crate) fn jitter_unit() -> f64 {
    rand::thread_rng().gen::<f64>()
}

/// What the broker said when it closed the connection: a `wire::Error`
/// encoded in the QUIC application close reason.
pub fn close_reason(e: &quinn::ConnectionError) -> Option<wire::Error> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => prost::Message::decode(c.reason.as_ref()).ok(),
        _ => None,
    }
}

/// The longest retry-after or spread the agent honours (a broker asks for
/// at most 10 minutes of spread, RFD 0008).
pub(crate) const MAX_BROKER_WAIT: Duration = Duration::from_secs(600);

/// The wait a refused handshake asks for, if `e` is one: the broker's
/// admission control had too many handshakes in flight (RFD 0008).
pub fn refused_retry_after(e: &quinn::ConnectionError) -> Option<Duration> {
    match e {
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            Some(grantline_proto::REFUSED_RETRY_AFTER)
        }
        _ => None,
    }
}

/// How long to wait before reconnecting: full-jitter backoff, but never
/// sooner than a retry-after the broker asked for (plus up to that much
/// again, so a restarting broker is not met by every agent at once). A
/// broker that names a spread (a restart under a large fleet) gets its
/// retry-after plus a uniform share of the spread instead.
pub fn reconnect_wait(attempt: u32, retry_after: Duration, spread: Duration, unit: f64) -> Duration {
    // What a broker asks for is bounded by what a broker would ask for: a
    // corrupt or hostile close reason cannot park the agent for weeks.
    let (retry_after, spread) = (retry_after.min(MAX_BROKER_WAIT), spread.min(MAX_BROKER_WAIT));
    let unit = unit.clamp(0.0, 1.0);
    let jittered = backoff(attempt, Duration::from_millis(200), Duration::from_secs(30), unit);
    if !spread.is_zero() {
        retry_after + spread.mul_f64(unit)
    } else if retry_after.is_zero() {
        jittered
    } else {
        retry_after + retry_after.mul_f64(unit).max(jittered)
    }
}

/// A connection that lived this long resets the reconnection backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// The backoff step at which a shut-out identity retries: waits of up to
/// the 30 s cap.
const SHUT_OUT_ATTEMPT: u32 = 8;

pub(crate) async fn maintain_connection(agent: Arc<Agent>) {
    let mut attempt = 0u32;
    loop {
        let (mut retry_after, mut spread) = (Duration::ZERO, Duration::ZERO);
        if agent.identity.read().map(|i| i.not_after <= now()).unwrap_or(false) {
            if let Err(e) = crate::recover::reenroll(&agent).await {
                tracing::warn!(error = %format!("{e:#}"), "re-enrollment not possible yet");
            }
        }
        match connect(&agent).await {
            Ok(conn) => {
                let connected_at = tokio::time::Instant::now();
                agent.conn.send_replace(Some(conn.clone()));
                announce(&format!("grantline-agent connected to {}", agent.target().0));
                tokio::select! {
                    reason = conn.closed() => {
                        agent.conn.send_replace(None);
                        // Only a connection that lasted starts the backoff
                        // afresh: one the broker closes at once (an identity
                        // it no longer takes) must not be retried at once.
                        if connected_at.elapsed() >= STABLE_CONNECTION {
                            attempt = 0;
                        }
                        match close_reason(&reason) {
                            Some(e) if e.code == ErrorCode::Revoked as i32 => {
                                agent.revoked.store(true, std::sync::atomic::Ordering::SeqCst);
                                tracing::error!(reason = %e.message, "the broker revoked this node; not reconnecting");
                                announce(&format!("grantline-agent revoked: {}", e.message));
                                // Only an admin can undo this: re-enrolling
                                // as another node takes a new join token.
                                return std::future::pending().await;
                            }
                            Some(e) if e.code == ErrorCode::Unauthenticated as i32 => {
                                // This identity no longer speaks for the node
                                // (it was enrolled again elsewhere, or the
                                // broker does not know it): only a new
                                // enrollment helps, so ask for one, slowly.
                                tracing::error!(
                                    reason = %e.message,
                                    "the broker no longer accepts this node's identity; enroll again with a new join token"
                                );
                                announce(&format!("grantline-agent shut out: {}", e.message));
                                attempt = attempt.max(SHUT_OUT_ATTEMPT);
                            }
                            Some(e) => {
                                tracing::warn!(reason = %e, "the broker closed the connection; reconnecting");
                                retry_after = Duration::from_millis(u64::from(e.retry_after_ms));
                                spread = Duration::from_millis(u64::from(e.retry_spread_ms));
                            }
                            None => tracing::warn!(%reason, "connection to the broker lost; reconnecting"),
                        }
                        // Lost, or closed for a restart: in a fleet, the
                        // next broker takes the node (revocation returned
                        // above; a shut-out identity is refused everywhere).
                        agent.fail_over();
                    }
                    () = agent.renewed.notified() => {
                        // Reconnect with the new identity; the old connection
                        // stays up a little for requests already under way.
                        tracing::info!("identity renewed; reconnecting with it");
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(10)).await;
                            conn.close(0u32.into(), b"identity renewed");
                        });
                        continue;
                    }
                }
            }
            Err(e) => {
                let expired = agent.identity.read().map(|i| i.not_after <= now()).unwrap_or(false);
                if let Some(wait) = e.downcast_ref().and_then(refused_retry_after) {
                    tracing::info!(retry_after = ?wait, "the broker is busy (handshake refused); retrying");
                    retry_after = wait;
                } else if expired {
                    tracing::error!("the node identity expired; enroll again with a new join token");
                } else {
                    tracing::warn!(error = %format!("{e:#}"), "cannot connect to the broker");
                }
            }
        }
        let wait = reconnect_wait(attempt, retry_after, spread, jitter_unit());
        attempt = attempt.saturating_add(1);
        // With an expired identity, a join token an admin drops into the
        // token file is acted on within a second, not after the backoff.
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            let expired = agent.identity.read().map(|i| i.not_after <= now()).unwrap_or(false);
            if expired && agent.policy.join_token_file.exists() {
                break;
            }
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + Duration::from_secs(1))).await;
        }
    }
}

async fn connect(agent: &Agent) -> Result<quinn::Connection> {
    let identity = agent.identity.read().map_err(|_| anyhow::anyhow!("identity lock poisoned"))?.clone();
    let cfg = client_for(agent, &identity)?;
    let (addr, name) = agent.target().clone();
    let connecting = match agent.endpoint.connect_with(cfg, addr, &name) {
        Ok(c) => c,
        Err(e) => {
            agent.fail_over();
            return Err(anyhow::Error::new(e).context(format!("cannot connect to the broker at {addr}")));
        }
    };
    let connected = tokio::time::timeout(Duration::from_secs(10), connecting).await;
    match connected {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => {
            // A broker that refuses or cannot be reached: the next one of a
            // fleet is tried after the backoff.
            agent.fail_over();
            Err(anyhow::Error::new(e).context(format!("cannot connect to the broker at {addr}")))
        }
        Err(_) => {
            agent.fail_over();
            anyhow::bail!("the handshake with the broker at {addr} timed out")
        }
    }
}

/// The TLS client for `identity`: the one used before while the identity
/// is the same (it holds the broker's session tickets), a new one after a
/// renewal or re-enrollment.
fn client_for(agent: &Agent, identity: &Identity) -> Result<quinn::ClientConfig> {
    let leaf = identity.chain.first().map(|c| c.to_vec()).unwrap_or_default();
    let mut cached = agent.client.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match cached.as_ref() {
        Some((l, cfg)) if *l == leaf => Ok(cfg.clone()),
        _ => {
            let cfg = tls::client_config_with(&agent.ca_pem, Some(identity), agent.targets.len() > 1)?;
            *cached = Some((leaf, cfg.clone()));
            Ok(cfg)
        }
    }
}

/// A live connection, waiting up to `wait` for one.
pub(crate) async fn connection(agent: &Agent, wait: Duration) -> Option<quinn::Connection> {
    let mut rx = agent.conn.subscribe();
    let conn = match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
        Ok(Ok(guard)) => guard.clone(),
        _ => None,
    };
    conn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_waits_honour_the_broker() {
        let (s, ms) = (Duration::from_secs, Duration::from_millis);
        // Nothing asked for: the backoff alone.
        assert_eq!(reconnect_wait(0, Duration::ZERO, Duration::ZERO, 0.5), ms(100));
        assert_eq!(reconnect_wait(10, Duration::ZERO, Duration::ZERO, 0.5), s(15));
        // A retry-after: at least that, plus up to as much again (or the backoff).
        assert_eq!(reconnect_wait(0, s(1), Duration::ZERO, 0.0), s(1));
        assert_eq!(reconnect_wait(0, s(1), Duration::ZERO, 0.5), ms(1500));
        assert_eq!(reconnect_wait(10, s(1), Duration::ZERO, 0.5), s(16));
        // A spread: the retry-after plus a uniform share of it, whatever the attempt.
        assert_eq!(reconnect_wait(0, s(1), s(50), 0.0), s(1));
        assert_eq!(reconnect_wait(0, s(1), s(50), 0.5), s(26));
        assert_eq!(reconnect_wait(7, s(1), s(50), 1.0), s(51));
        assert_eq!(reconnect_wait(0, s(1), s(50), 7.0), s(51), "the unit is clamped");
        // Whatever the close reason says, at most ten minutes each.
        let forever = Duration::from_millis(u64::from(u32::MAX));
        assert_eq!(reconnect_wait(0, forever, forever, 1.0), s(1200));
        assert_eq!(reconnect_wait(0, forever, Duration::ZERO, 1.0), s(1200));
    }

    #[test]
    fn only_connection_refused_is_a_refusal() {
        let close = |code| {
            quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: code,
                frame_type: None,
                reason: Default::default(),
            })
        };
        assert_eq!(
            refused_retry_after(&close(quinn::TransportErrorCode::CONNECTION_REFUSED)),
            Some(grantline_proto::REFUSED_RETRY_AFTER)
        );
        assert_eq!(refused_retry_after(&close(quinn::TransportErrorCode::PROTOCOL_VIOLATION)), None);
        assert_eq!(refused_retry_after(&quinn::ConnectionError::TimedOut), None);
    }
}
