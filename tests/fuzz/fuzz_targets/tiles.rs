#![no_main]
//! tlog-tiles objects as an anchor holds them: entry bundles and hash tiles.
use grantline_proto::audit::tiles;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = tiles::parse_bundle(data) {
        for e in entries {
            let _ = grantline_proto::audit::Entry::decode(e);
        }
    }
    let _ = tiles::parse_tile(data);
});
