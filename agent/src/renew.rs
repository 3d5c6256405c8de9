//! When to renew and when to retry: pure functions of times and randomness
//! given by the caller.

use std::time::Duration;

/// Renew at half of the lifetime, ± 10 % of that half (so between 45 % and
/// 55 % of the lifetime), like SPIRE. `jitter` is uniform in [-1, 1].
pub fn renew_at(not_before: i64, not_after: i64, jitter: f64) -> i64 {
    let lifetime = (not_after - not_before).max(0) as f64;
    let fraction = 0.5 + 0.05 * jitter.clamp(-1.0, 1.0);
    // Lifetimes are at most days, far inside f64's exact integer range.
    #[allow(clippy::cast_possible_truncation)]
    let offset = (lifetime * fraction) as i64;
    not_before + offset
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
        assert_eq!(renew_at(1000, 2000, 0.0), 1500);
        assert_eq!(renew_at(1000, 2000, -1.0), 1450);
        assert_eq!(renew_at(1000, 2000, 1.0), 1550);
        assert_eq!(renew_at(1000, 2000, 7.0), 1550);
        for i in -100..=100 {
            let t = renew_at(0, 86_400, f64::from(i) / 100.0);
            assert!((38_880..=47_520).contains(&t), "{t}");
        }
        assert_eq!(renew_at(5, 1, 0.0), 5);
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
