#![no_main]
//! The SPIFFE socket's rewriter of what HTTP/2 clients send (the agent's
//! first reader of a local caller's bytes): any bytes, in any chunking,
//! either come out as whole frames or end the connection; never a panic,
//! and what it holds stays within its bounds.
use libfuzzer_sys::fuzz_target;

use grantline_agent::h2_authority::{AuthorityFix, MAX_FEED_OUTPUT, MAX_FRAME, MAX_HEADER_LIST};

fuzz_target!(|data: &[u8]| {
    let Some((&step, data)) = data.split_first() else { return };
    let step = usize::from(step).max(1);
    let mut fix = AuthorityFix::default();
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    for chunk in data.chunks(step) {
        input.extend_from_slice(chunk);
        // As the socket reads: feed, hand the output on, feed again while
        // that makes progress.
        loop {
            let (before, mut out) = (input.len(), Vec::new());
            if fix.feed(&mut input, &mut out).is_err() {
                return;
            }
            assert!(out.len() <= MAX_FEED_OUTPUT + MAX_HEADER_LIST + MAX_FRAME + 64, "output is bounded per call");
            if input.len() == before {
                break;
            }
        }
        assert!(input.len() <= 9 + MAX_FRAME, "a whole frame is never held back");
    }
});
