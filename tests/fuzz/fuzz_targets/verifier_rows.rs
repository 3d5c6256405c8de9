#![no_main]
//! The pure verifier over rows an attacker chose: each row is
//! `u16 entry length, entry, 32-byte hash, 64-byte signature`.
use grantline_proto::audit::{ChainVerifier, StoredEntry};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mut v = ChainVerifier::new(common::verifier());
    v.want_root_at(2);
    let mut rest = data;
    let mut seq = 0i64;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        if rest.len() < n + 96 {
            break;
        }
        let row = StoredEntry {
            seq,
            entry: rest[..n].to_vec(),
            hash: rest[n..n + 32].to_vec(),
            signature: rest[n + 32..n + 96].to_vec(),
        };
        rest = &rest[n + 96..];
        seq += 1;
        if v.push(row).is_err() {
            return;
        }
    }
    let _ = v.finish();
});
