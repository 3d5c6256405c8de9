#![no_main]
//! An OpenSSH public key line as SSH grants receive it.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(key) = ssh_key::PublicKey::from_openssh(text) {
            let _ = grantline_daemon::issuer::keys::check_ssh_key(&key);
        }
    }
});
