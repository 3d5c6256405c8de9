#![no_main]
//! One audit entry's bytes: the fixed fields, the event, and its bounds.
use grantline_proto::audit::Entry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = Entry::decode(data) {
        if let Ok(event) = entry.event() {
            let bounded = event.bounded();
            let _ = Entry::encode_bounded(entry.origin, entry.seq, entry.time_ms, &entry.prev, bounded);
        }
    }
});
