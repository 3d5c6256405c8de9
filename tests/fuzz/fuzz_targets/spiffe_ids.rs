#![no_main]
//! SPIFFE ID templates filled in from what a node says of its caller
//! (RFD 0011): whatever the template and the caller's attributes, the result
//! is a valid SPIFFE ID of the broker's trust domain, with a path, or an error.
use libfuzzer_sys::fuzz_target;

use grantline_daemon::spiffe::{check_audience, check_template, expand};
use grantline_proto::audit::event::CallerInfo;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.splitn(4, '\n');
    let (template, node, unit, exe) =
        (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let _ = check_audience(template);
    if check_template(template).is_err() {
        return;
    }
    let caller = CallerInfo { uid: 1, gid: 2, pid: 3, exe: exe.into(), unit: unit.into() };
    if let Ok(id) = expand(template, "example.org", node, &caller) {
        let parsed = spiffe::SpiffeId::new(&id).expect("expand gives a valid SPIFFE ID");
        assert_eq!(parsed.trust_domain_name(), "example.org");
        assert!(!parsed.path().is_empty());
    }
});
