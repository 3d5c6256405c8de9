//! How often local callers may have the agent ask the broker for new SVIDs
//! (RFD 0011): every answer, SVID or denial, is signed and audited, so one
//! local user must not be able to grow the broker's log without bound.

use std::collections::HashMap;
use std::time::Instant;

use grantline_proto::wire::{self, ErrorCode};

use crate::principals::Principal;

/// The most principals whose budgets are tracked at once; past it, full ones
/// are forgotten (a full budget is what a new one starts with).
const MAX_TRACKED: usize = 4096;

/// New SVIDs the broker may be asked for per second, per principal
/// (`crate::principals`), with a burst of ten seconds' worth: every
/// answer, SVID or denial, is signed and audited, so one local user
/// asking for new audiences, or as new executables, in a loop must not grow
/// the broker's log without bound. Cached SVIDs and refusals cost nothing.
#[derive(Debug)]
pub(crate) struct Budget {
    rate: f64,
    buckets: HashMap<Principal, (f64, Instant)>,
}

impl Budget {
    pub(crate) fn new(per_second: u32) -> Self {
        Self { rate: f64::from(per_second), buckets: HashMap::new() }
    }

    /// Takes one ask from `principal`'s budget at `at`, if it has one left.
    pub(crate) fn take(&mut self, principal: Principal, at: Instant) -> bool {
        let burst = self.rate * 10.0;
        if self.buckets.len() >= MAX_TRACKED {
            self.buckets
                .retain(|_, (tokens, since)| *tokens + at.duration_since(*since).as_secs_f64() * self.rate < burst);
        }
        let (tokens, since) = self.buckets.entry(principal).or_insert((burst, at));
        *tokens = (*tokens + at.duration_since(*since).as_secs_f64() * self.rate).min(burst);
        *since = at;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }
}

pub(crate) fn too_many_asks(uid: u32) -> wire::Error {
    wire::Error::new(
        ErrorCode::Unavailable,
        format!("uid {uid} asked for more new SVIDs than the agent asks the broker for per second; retry shortly"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Review finding: any local user could have the broker mint and audit
    /// JWT-SVIDs (or denials) without bound by asking for new audiences or
    /// as new executables; each principal now has a budget.
    #[test]
    fn broker_asks_are_budgeted_per_principal() {
        let mut m = Budget { rate: 2.0, buckets: HashMap::new() };
        let t = Instant::now();
        let user = Principal::Uid(1000);
        let taken = (0..100).filter(|_| m.take(user, t)).count();
        assert_eq!(taken, 20, "a burst of ten seconds' worth");
        assert!(m.take(Principal::Uid(1001), t), "another user has a budget of its own");
        assert!(!m.take(user, t + Duration::from_millis(100)), "refilled at the rate, not at once");
        assert!(m.take(user, t + Duration::from_secs(1)), "two a second come back");
        // The ids a user was delegated answer to that user (crate::principals).
        let p = crate::principals::Principals::parse("1002:100000:65536\n", |_| None);
        let delegated = (0..100).filter(|i| m.take(p.of(100_000 + i, None), t)).count();
        assert_eq!(delegated, 20, "a hundred delegated uids are one budget");
    }
}
