#![no_main]
//! The broker's policy file.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = grantline_daemon::policy::Policy::parse(text);
    }
});
