//! Small-scale runs of the scale scenarios (RFD 0008): fixture provisioning
//! and a fleet of agents held connected while they ask for grants, with the
//! load generator's JSON checked for completeness and the log verified.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use grantline_tests::{bin, stderr, Broker};

fn loadgen(args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("grantline-loadgen")).args(args).output().unwrap();
    assert!(out.status.success(), "grantline-loadgen {args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn number(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut at = v;
    for p in path {
        at = &at[*p];
    }
    at.as_f64().unwrap_or_else(|| panic!("{} is not a number in {v}", path.join(".")))
}

#[test]
fn two_thousand_provisioned_agents_hold_their_connections_and_get_grants() {
    const AGENTS: usize = 2000;
    let state = tempfile::tempdir().unwrap();
    let fixture = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_in(state.path());
    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(broker.proc.wait().success());

    let dir = state.path().to_str().unwrap();
    let fix = fixture.path().to_str().unwrap();
    let provisioned = loadgen(&["provision", "--state-dir", dir, "--nodes", &AGENTS.to_string(), "--out", fix]);
    assert_eq!(provisioned["nodes"], AGENTS);

    broker.restart();
    let pid = broker.proc.pid().to_string();
    let ca = state.path().join("ca.pem");
    let report = loadgen(&[
        "hold",
        "--broker",
        &broker.addr,
        "--ca-file",
        ca.to_str().unwrap(),
        "--fixture",
        fix,
        "--agents",
        &AGENTS.to_string(),
        "--endpoints",
        "4",
        "--role",
        "dev",
        "--san",
        "load.example.com",
        "--grant-rate",
        "200",
        "--seconds",
        "2",
        "--broker-pid",
        &pid,
    ]);
    assert_eq!(report["connected"], AGENTS, "{report}");
    assert_eq!(report["still_connected"], AGENTS, "{report}");
    assert_eq!(report["connect"]["errors"], serde_json::json!({}), "{report}");
    assert_eq!(report["grants"]["errors"], serde_json::json!({}), "{report}");
    assert!(number(&report, &["grants", "ok"]) >= 300.0, "{report}");
    for p in ["p50", "p99", "p999"] {
        assert!(number(&report, &["grants", "latency_ms", p]) > 0.0, "{report}");
        assert!(number(&report, &["connect", "latency_ms", p]) > 0.0, "{report}");
    }
    assert!(number(&report, &["broker", "rss_bytes"]) > 0.0, "{report}");
    assert!(number(&report, &["broker", "cpu_seconds"]) > 0.0, "{report}");
    assert!(number(&report, &["broker_rss_per_agent_bytes"]) > 0.0, "{report}");

    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(broker.proc.wait().success());
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
    let granted = report["grants"]["ok"].as_u64().unwrap();
    // Genesis, one enrollment per fixture node, and every grant.
    assert!(v["entries"].as_u64().unwrap() >= 1 + AGENTS as u64 + granted, "{v}");
}
