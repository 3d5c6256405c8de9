#![no_main]
//! A QUIC stream's bytes as the broker reads them: the frame, the request,
//! and for a grant every check made before policy.
use grantline_proto::{frame, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = frame::decode::<wire::Request>(data) {
        if let Some(wire::request::Body::Grant(g)) = &req.body {
            let _ = grantline_daemon::server::check_grant_request(g);
        }
        if let Some(wire::request::Body::Enroll(e)) = &req.body {
            let _ = grantline_daemon::issuer::check_csr(&e.csr_der);
        }
    }
});
