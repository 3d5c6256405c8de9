//! The one wall clock: seconds since the Unix epoch, as certificates,
//! tokens and the audit log count them.

use std::time::{SystemTime, UNIX_EPOCH};

/// `t` in whole seconds since the epoch (0 before it, saturating far after).
pub fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// Now, in whole seconds since the epoch.
pub fn now_unix() -> i64 {
    unix(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_since_the_epoch_saturate_at_both_ends() {
        assert_eq!(unix(UNIX_EPOCH), 0);
        assert_eq!(unix(UNIX_EPOCH - std::time::Duration::from_secs(5)), 0);
        assert_eq!(unix(UNIX_EPOCH + std::time::Duration::from_secs(90)), 90);
        assert!(now_unix() > 1_700_000_000);
    }
}
