#![no_main]
//! The agent's local socket: a frame holding a `LocalRequest`.
use grantline_proto::{frame, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = frame::decode::<wire::LocalRequest>(data);
    let _ = frame::decode::<wire::LocalResponse>(data);
});
