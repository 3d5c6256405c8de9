#![no_main]
//! A C2SP tlog-checkpoint: its body alone and as a signed note.
use grantline_proto::audit::checkpoint::Checkpoint;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Checkpoint::parse_body(text);
        let _ = Checkpoint::open_any(text, &[common::verifier()]);
    }
});
