//! Admission control on QUIC handshakes (RFD 0008).
//!
//! A handshake is the most expensive thing an agent asks of the broker (key
//! exchange, a signature, the client chain's verification), and a reconnect
//! storm asks it of every agent at once. Past a few hundred handshakes in
//! flight the broker makes each sender prove its address with a stateless
//! QUIC retry (a spoofed flood then costs no state); past its limit it
//! refuses the connection outright (QUIC CONNECTION_REFUSED), which agents
//! answer by waiting [`grantline_proto::REFUSED_RETRY_AFTER`] plus full
//! jitter. Work refused early is cheaper than handshakes that time out after
//! the broker has paid for them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The thresholds, from `[limits]` in grantlined.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Handshakes in flight above which unvalidated senders get a QUIC retry.
    pub retry_above: usize,
    /// Handshakes in flight at which new ones are refused.
    pub max_handshakes: usize,
    /// The rate of reconnections a restart asks its agents to keep to.
    pub reconnects_per_second: usize,
}

impl Default for Limits {
    /// Two cores complete about 1,000 handshakes a second under load
    /// (RFD 0008): 4,096 in flight is four seconds of work, well inside the
    /// agents' ten-second handshake timeout.
    fn default() -> Self {
        Self { retry_above: 256, max_handshakes: 4096, reconnects_per_second: 2000 }
    }
}

/// Over how long a broker that is going away asks `agents` to spread their
/// reconnections (beyond the fixed retry-after), so that they arrive at
/// `per_second`: at least a second, at most ten minutes.
pub fn reconnect_spread(agents: usize, per_second: usize) -> Duration {
    #[allow(clippy::cast_precision_loss)]
    let secs = agents as f64 / per_second.max(1) as f64;
    Duration::from_secs_f64(secs.clamp(1.0, 600.0))
}

/// What to do with a new connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Accept,
    /// Ask the sender to prove its address first (stateless retry).
    Retry,
    /// Refuse now; the agent comes back after its retry-after.
    Refuse,
}

/// The decision for one attempt, given the handshakes already in flight and
/// whether the sender's address is already validated (it answered a retry).
pub fn decide(in_flight: usize, address_validated: bool, limits: Limits) -> Decision {
    if in_flight >= limits.max_handshakes {
        Decision::Refuse
    } else if in_flight >= limits.retry_above && !address_validated {
        Decision::Retry
    } else {
        Decision::Accept
    }
}

/// Counts handshakes in flight; a [`Slot`] is one, released when dropped.
#[derive(Debug, Default, Clone)]
pub struct Handshakes(Arc<AtomicUsize>);

impl Handshakes {
    pub fn in_flight(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    pub fn slot(&self) -> Slot {
        self.0.fetch_add(1, Ordering::Relaxed);
        Slot(self.0.clone())
    }
}

/// One handshake in flight.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_at_every_boundary() {
        let l = Limits { retry_above: 2, max_handshakes: 4, ..Limits::default() };
        let table = [
            (0, false, Decision::Accept),
            (1, false, Decision::Accept),
            (2, false, Decision::Retry),
            (2, true, Decision::Accept),
            (3, false, Decision::Retry),
            (3, true, Decision::Accept),
            (4, false, Decision::Refuse),
            (4, true, Decision::Refuse),
            (usize::MAX, true, Decision::Refuse),
        ];
        for (in_flight, validated, want) in table {
            assert_eq!(decide(in_flight, validated, l), want, "{in_flight} in flight, validated {validated}");
        }
        // No retry threshold below the limit: accept or refuse only.
        let l = Limits { retry_above: 10, max_handshakes: 4, ..Limits::default() };
        assert_eq!(decide(3, false, l), Decision::Accept);
        assert_eq!(decide(4, false, l), Decision::Refuse);
    }

    #[test]
    fn a_restart_spreads_reconnections_to_the_rate() {
        let s = Duration::from_secs;
        assert_eq!(reconnect_spread(0, 2000), s(1));
        assert_eq!(reconnect_spread(2000, 2000), s(1));
        assert_eq!(reconnect_spread(100_000, 2000), s(50));
        assert_eq!(reconnect_spread(100_000, 0), s(600), "a zero rate is taken as one per second, capped");
        assert_eq!(reconnect_spread(usize::MAX, 1), s(600));
    }

    #[test]
    fn slots_count_and_release() {
        let h = Handshakes::default();
        let a = h.slot();
        let b = h.slot();
        assert_eq!(h.in_flight(), 2);
        drop(a);
        assert_eq!(h.in_flight(), 1);
        drop(b);
        assert_eq!(h.in_flight(), 0);
    }
}
