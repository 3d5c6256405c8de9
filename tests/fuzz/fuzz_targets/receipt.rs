#![no_main]
//! A grant receipt as the agent checks it against its pinned key, and as a
//! fleet agent checks it against its fleet key (RFD 0010).
use grantline_proto::audit::receipt;
use grantline_proto::wire;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = <wire::Receipt as prost::Message>::decode(data) {
        let _ = receipt::check(Some(&r), &common::verifier());
        let _ = receipt::current_key(&r, &common::verifier());
        // A fleet agent's check: another origin's key under the fleet key.
        let trust = receipt::Trust { pinned: common::verifier(), fleet: Some(common::verifier()) };
        let _ = trust.check(Some(&r));
    }
});
