#![no_main]
//! A C2SP tlog-proof (offline receipt), checked for a leaf.
use grantline_proto::audit::checkpoint::InclusionReceipt;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(proof) = InclusionReceipt::parse(text) {
            let _ = proof.verify(&[0; 32], &[common::verifier()]);
        }
    }
});
