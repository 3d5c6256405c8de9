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

/// Now, in milliseconds since the epoch (heartbeats and delays between
/// brokers of a fleet, which share this clock through NTP).
pub fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// `unix` seconds as an RFC 3339 UTC time, or the number itself when it is
/// out of the calendar's range.
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
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

    #[test]
    fn times_print_as_rfc3339_or_as_the_number() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(i64::MAX), i64::MAX.to_string());
    }
}
