#![no_main]
//! A C2SP signed note, opened under the seed key.
use grantline_proto::audit::note;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = note::body(text);
        let _ = note::open(text, &[common::verifier()]);
    }
});
