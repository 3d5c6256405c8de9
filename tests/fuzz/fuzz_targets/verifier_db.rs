#![no_main]
//! `grantline audit verify` over a whole database file an attacker made.
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let db = dir.path().join("audit.db");
    if std::fs::write(&db, data).is_err() {
        return;
    }
    let _ = grantline_daemon::verify::verify_db(&db, &[common::verifier()], false, &[]);
});
