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
    // The broker's own CPU per unit of work, from /proc (RFD 0008).
    assert!(number(&report, &["broker_cpu_us_per_handshake"]) > 0.0, "{report}");
    assert!(number(&report, &["broker_cpu_us_per_grant"]) > 0.0, "{report}");

    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(broker.proc.wait().success());
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
    let granted = report["grants"]["ok"].as_u64().unwrap();
    // Genesis, one enrollment per fixture node, and every grant.
    assert!(v["entries"].as_u64().unwrap() >= 1 + AGENTS as u64 + granted, "{v}");
}

/// A stopped dev broker's state with `n` provisioned agents, restarted.
fn provisioned_broker(n: usize, extra: &[&str]) -> (Broker, tempfile::TempDir, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let fixture = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_in(state.path());
    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(broker.proc.wait().success());
    let provisioned = loadgen(&[
        "provision",
        "--state-dir",
        state.path().to_str().unwrap(),
        "--nodes",
        &n.to_string(),
        "--out",
        fixture.path().to_str().unwrap(),
    ]);
    assert_eq!(provisioned["nodes"], n);
    broker.restart_with(extra);
    (broker, state, fixture)
}

fn fleet_args(broker: &Broker, state: &std::path::Path, fixture: &std::path::Path, n: usize) -> Vec<String> {
    [
        "--broker",
        &broker.addr,
        "--ca-file",
        state.join("ca.pem").to_str().unwrap(),
        "--fixture",
        fixture.to_str().unwrap(),
        "--agents",
        &n.to_string(),
        "--endpoints",
        "4",
        "--role",
        "dev",
        "--san",
        "load.example.com",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

#[test]
fn a_rate_sweep_finds_a_peak_and_measures_half_of_it() {
    const AGENTS: usize = 200;
    let (broker, state, fixture) = provisioned_broker(AGENTS, &[]);
    let mut args = vec!["sweep".to_owned()];
    args.extend(fleet_args(&broker, state.path(), fixture.path(), AGENTS));
    args.extend(["--start-rate", "400", "--step-seconds", "1", "--broker-pid"].map(str::to_owned));
    args.push(broker.proc.pid().to_string());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = loadgen(&refs);
    assert_eq!(report["connected"], AGENTS, "{report}");
    assert!(!report["steps"].as_array().unwrap().is_empty(), "{report}");
    assert!(number(&report, &["peak_per_second"]) >= 400.0 * 0.9, "{report}");
    assert!(number(&report, &["p99_ms_at_half_peak"]) > 0.0, "{report}");
    assert!(number(&report, &["at_half_peak", "ok"]) > 0.0, "{report}");
    assert!(number(&report, &["broker", "cpu_seconds"]) > 0.0, "{report}");
    assert!(number(&report, &["broker_cpu_us_per_grant_at_half_peak"]) > 0.0, "{report}");
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}

#[test]
fn after_a_restart_every_agent_reconnects_and_is_granted_again_and_nothing_is_lost() {
    const AGENTS: usize = 500;
    // Admission control far below the fleet: agents refused on the way in
    // and after the restart must come back by themselves.
    const LIMITS: [&str; 4] = ["--max-handshakes", "16", "--retry-handshakes-above", "8"];
    let (mut broker, state, fixture) = provisioned_broker(AGENTS, &LIMITS);
    let ready = state.path().join("storm-ready");
    let mut args = vec!["storm".to_owned()];
    args.extend(fleet_args(&broker, state.path(), fixture.path(), AGENTS));
    let pid_file = state.path().join("storm-broker.pid");
    args.extend([
        "--ready-file".to_owned(),
        ready.display().to_string(),
        "--limit-seconds".to_owned(),
        "60".to_owned(),
        "--broker-pid-file".to_owned(),
        pid_file.display().to_string(),
    ]);
    let mut storm =
        grantline_tests::Proc::spawn("grantline-loadgen storm", Command::new(bin("grantline-loadgen")).args(&args));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ready.exists() {
        assert!(std::time::Instant::now() < deadline, "the fleet never connected");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A graceful restart: the broker tells agents to retry after a second.
    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(broker.proc.wait().success());
    broker.restart_with(&LIMITS);
    // Read when the storm ends, at least the broker's one-second retry-after later.
    std::fs::write(&pid_file, broker.proc.pid().to_string()).unwrap();
    let line = storm.wait_line_containing("\"scenario\":\"storm\"");
    let report: serde_json::Value = serde_json::from_str(&line).unwrap();
    eprintln!("storm report: {report}");
    assert_eq!(report["granted_before"], AGENTS, "{report}");
    assert_eq!(report["all_cut"], true, "{report}");
    assert_eq!(report["regranted"], AGENTS, "{report}");
    assert_eq!(report["errors_after"], serde_json::json!({}), "{report}");
    assert!(report["retries_after"].is_object(), "{report}");
    assert!(report["connect"]["retries"].is_object(), "{report}");
    assert!(number(&report, &["storm_seconds"]) >= 1.0, "agents waited out the retry-after: {report}");
    assert!(number(&report, &["broker_cpu_us_per_regranted_agent"]) > 0.0, "{report}");

    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(broker.proc.wait().success());
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
    let grants =
        broker.events().into_iter().filter(|e| matches!(e, grantline_proto::audit::Event::Grant { .. })).count();
    assert_eq!(grants, 2 * AGENTS, "every acknowledged grant is in the log");
}
