//! When to renew and when to retry: pure functions of times and randomness
//! given by the caller.

use std::time::Duration;

/// The least time between two renewals of one credential, in seconds: a
/// credential that lives shorter than this is renewed no more often.
pub const MIN_RENEW_WAIT: i64 = 5;

/// A credential living less than this from its receipt, in seconds, is too
/// short to renew reliably (a broker round trip, a retry, a reload): the
/// agent warns that its TTL should be raised.
pub const MIN_USEFUL_LIFETIME: i64 = 30;

/// Renew at half of the lifetime counted from `start`, ± 10 % of that half
/// (so between 45 % and 55 % of the lifetime), like SPIRE; never sooner than
/// [`MIN_RENEW_WAIT`] after `now`. `start` is when the credential was received
/// (a certificate's not-before is backdated for clock skew, so counting from
/// it would make a short-lived credential due at once). `jitter` is uniform in
/// [-1, 1].
pub fn renew_at(start: i64, not_after: i64, jitter: f64, now: i64) -> i64 {
    let lifetime = (not_after - start).max(0) as f64;
    let fraction = 0.5 + 0.05 * jitter.clamp(-1.0, 1.0);
    // Lifetimes are at most days, far inside f64's exact integer range.
    #[allow(clippy::cast_possible_truncation)]
    let offset = (lifetime * fraction) as i64;
    (start + offset).max(now.saturating_add(MIN_RENEW_WAIT))
}

/// Exponential backoff with full jitter: a uniform wait in [0, min(cap,
/// base * 2^attempt)]. `unit` is uniform in [0, 1). Agents that lost the broker
/// at the same moment spread their reconnects over the whole window.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let ceiling = base.saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX)).min(cap);
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_window_is_half_life_plus_minus_ten_percent() {
        assert_eq!(renew_at(1000, 2000, 0.0, 1000), 1500);
        assert_eq!(renew_at(1000, 2000, -1.0, 1000), 1450);
        assert_eq!(renew_at(1000, 2000, 1.0, 1000), 1550);
        assert_eq!(renew_at(1000, 2000, 7.0, 1000), 1550);
        for i in -100..=100 {
            let t = renew_at(0, 86_400, f64::from(i) / 100.0, 0);
            assert!((38_880..=47_520).contains(&t), "{t}");
        }
        assert_eq!(renew_at(5, 1, 0.0, 5), 5 + MIN_RENEW_WAIT);
    }

    /// The review's tight loop: a 60 s credential whose not-before is
    /// backdated 60 s was due the moment it arrived. Counted from receipt it
    /// is due at half its life, and nothing is ever due sooner than the floor.
    #[test]
    fn short_lived_credentials_are_not_renewed_in_a_loop() {
        let received = 10_000;
        let (not_before, not_after) = (received - 60, received + 60);
        assert!(renew_at(not_before, not_after, 0.0, received) > received, "due at once from its not-before");
        for i in -10..=10 {
            let at = renew_at(received, not_after, f64::from(i) / 10.0, received);
            assert!((received + 27..=received + 33).contains(&at), "{at}");
        }
        for lifetime in [0, 1, 5, 9] {
            assert_eq!(renew_at(received, received + lifetime, 1.0, received), received + MIN_RENEW_WAIT);
        }
        // Already past due (a broker that was away): the floor, not a spin.
        assert_eq!(renew_at(0, 100, 0.0, 5_000), 5_000 + MIN_RENEW_WAIT);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(30);
        assert_eq!(backoff(0, base, cap, 0.999_999).as_millis(), 99);
        assert_eq!(backoff(3, base, cap, 0.5), Duration::from_millis(400));
        assert_eq!(backoff(40, base, cap, 0.5), Duration::from_secs(15));
        assert_eq!(backoff(5, base, cap, 0.0), Duration::ZERO);
    }
}
