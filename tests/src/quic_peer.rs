//! `tests/python/quic_peer.py`: an independent QUIC client (Python aioquic,
//! installed by `scripts/install-test-deps.sh`) for what Grantline's own
//! client never sends.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/quic_peer.py")
}

/// Runs the client with `args` (its mode first); its JSON report.
pub fn run(args: &[&str]) -> Value {
    let out = Command::new("python3").arg(script()).args(args).output().expect("python3 is needed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("No module named 'aioquic'"),
        "aioquic is not installed: run scripts/install-test-deps.sh (pip install aioquic)"
    );
    assert!(out.status.success(), "quic_peer.py {args:?} failed: {err}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("quic_peer.py printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// The broker's `host` and `port` from its `addr`.
pub fn host_port(addr: &str) -> (String, String) {
    let a: std::net::SocketAddr = addr.parse().expect("a socket address");
    (a.ip().to_string(), a.port().to_string())
}
