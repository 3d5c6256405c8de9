#![no_main]
//! A CSR (DER) as enrollment, renewal and X.509 grants receive it.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = grantline_daemon::issuer::check_csr(data) {
        let _ = csr.names_within(&["a.example".to_owned()]);
    }
});
