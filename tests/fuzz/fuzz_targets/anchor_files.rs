#![no_main]
//! What `verify-fleet --anchor` and a broker's anchor read from files: the
//! brokers file (verifier keys), the anchor's options file (KEY=VALUE) and
//! the anchor location's check (no object store is contacted).
use libfuzzer_sys::fuzz_target;

use grantline_daemon::audit::anchor;
use grantline_daemon::audit::fleet_anchor::parse_brokers;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_brokers(text, "brokers");
        let _ = anchor::parse_options(text, std::path::Path::new("anchor.env"));
        if let Some(location) = text.lines().next().filter(|l| l.contains("://")) {
            let _ = anchor::check(location, &anchor::Access::default());
        }
    }
});
