//! Connections without a node identity (enrollment, or a stranger): counted
//! per source address and in all, so that certificate-less peers cannot hold
//! the broker's memory (RFD 0009). Each may carry one request, then closes.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use grantline_proto::slots::{Slot, Slots};

/// Connections without a node identity one address may hold at once.
pub const PER_ADDRESS: usize = 8;
/// Connections without a node identity the broker holds at once.
pub const IN_ALL: usize = 512;
/// How long such a connection may take to send its one request.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Connections without a node identity, counted per source.
pub struct Anonymous {
    slots: Arc<Slots<IpAddr>>,
}

impl Default for Anonymous {
    fn default() -> Self {
        Self { slots: Slots::new(IN_ALL) }
    }
}

impl Anonymous {
    /// Admits a connection from `address`, or None when its source or the
    /// broker is at its limit.
    pub fn admit(&self, address: IpAddr) -> Option<Slot<IpAddr>> {
        self.slots.take(source_of(address), PER_ADDRESS)
    }
}

/// What one source is: an IPv4 address (also when mapped into IPv6), or an
/// IPv6 /64, the least a site or host is given, so that one host cannot
/// count as many by cycling through its own /64.
fn source_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_slash_64_is_one_source() {
        let a = Anonymous::default();
        let held: Vec<Slot<IpAddr>> = (0..u16::try_from(PER_ADDRESS).unwrap_or(0))
            .map(|i| a.admit(IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, i])).unwrap_or_else(|| panic!("admitted")))
            .collect();
        assert!(a.admit(IpAddr::from([0x2001, 0xdb8, 0, 1, 0xffff, 1, 2, 3])).is_none(), "same /64");
        assert!(a.admit(IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1])).is_some(), "another /64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap_or(IpAddr::from([0u8; 4]));
        assert_eq!(source_of(mapped), IpAddr::from([192, 0, 2, 7]));
        drop(held);
    }

    #[test]
    fn addresses_are_capped_each_and_in_all_and_slots_come_back() {
        let a = Anonymous::default();
        let one: IpAddr = "192.0.2.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let held: Vec<Slot<IpAddr>> =
            (0..PER_ADDRESS).map(|_| a.admit(one).unwrap_or_else(|| panic!("admitted"))).collect();
        assert!(a.admit(one).is_none(), "past its limit");
        drop(held);
        assert!(a.admit(one).is_some(), "slots come back when connections close");
        let many: Vec<Slot<IpAddr>> = (0..u32::try_from(IN_ALL).unwrap_or(0))
            .filter_map(|i| a.admit(IpAddr::from((10 << 24 | i).to_be_bytes())))
            .collect();
        assert_eq!(many.len(), IN_ALL);
        assert!(a.admit(IpAddr::from([10, 9, 9, 9])).is_none(), "the broker's limit holds for new addresses");
        assert!(a.slots.keys() <= IN_ALL, "no entry for refused ones");
    }
}
