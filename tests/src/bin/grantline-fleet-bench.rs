//! Measures a fleet of three real brokers on one real PostgreSQL (RFD 0010)
//! and prints one JSON object: revocation propagation (as the broker that
//! closes the node's connection records it, commit to close, and as the
//! agent sees it, from the start of `grantline nodes revoke` at another
//! broker to the close), the fleet database's transactions per second with
//! the fleet idle (no agents, then N), and per grant. `grantline-fleet-bench [NODES]` (default 20), after
//! `cargo build --release --workspace`.
//!
//! `grantline-fleet-bench failover [AGENTS]` (default 10,000): that many
//! load-generator agents enrolled at the fleet and spread over its three
//! brokers, one broker killed with SIGKILL, and the time until every agent
//! it held is granted again at another; then every grant acknowledged to
//! an agent is looked for in the brokers' logs (`lost` must be 0).

use std::time::{Duration, Instant};

use grantline_tests::fleet::{enroll, Fleet};
use grantline_tests::postgres::SUPERUSER_PASSWORD;
use grantline_tests::{metric, scrape};

fn xacts(fleet: &Fleet) -> f64 {
    let out = fleet.pg.psql(
        "postgres",
        SUPERUSER_PASSWORD,
        "SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'",
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0.0)
}

/// Database transactions per second over `window`, less the probe's own.
fn idle_rate(fleet: &Fleet, window: Duration) -> f64 {
    let before = xacts(fleet);
    std::thread::sleep(window);
    let after = xacts(fleet);
    (after - before - 1.0).max(0.0) / window.as_secs_f64()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    if std::env::args().nth(1).as_deref() == Some("failover") {
        let agents = std::env::args().nth(2).and_then(|n| n.parse().ok()).unwrap_or(10_000);
        let mut fleet = Fleet::start(3, "");
        println!("{}", grantline_tests::failover::kill_one_of(&mut fleet, agents));
        fleet.brokers.clear();
        return;
    }
    let nodes: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(20).max(1);
    let window = Duration::from_secs(10);
    let mut fleet = Fleet::start(0, "");
    let without_brokers = idle_rate(&fleet, window);
    for _ in 0..3 {
        fleet.add();
    }
    let metrics = fleet.brokers[2].proc.wait_line("grantlined metrics on");
    let idle_without_agents = idle_rate(&fleet, window);
    let (a, c) = (&fleet.brokers[0], &fleet.brokers[2]);
    let mut agents = Vec::new();
    for i in 0..nodes {
        let token = a.new_token(&[]);
        let (mut agent, out) = enroll(&c.addr, &c.path("ca.pem"), &token, &format!("bench-{i}"));
        assert!(out.status.success(), "enroll: {}", String::from_utf8_lossy(&out.stderr));
        agent.run();
        agents.push(agent);
    }
    // Presence settles within a second of the last connection.
    std::thread::sleep(Duration::from_secs(2));
    let idle_with_agents = idle_rate(&fleet, window);
    let grants = 50;
    let dir = agents[0].dir.path().to_str().expect("a UTF-8 temporary path").to_owned();
    let before = xacts(&fleet);
    let started = Instant::now();
    for _ in 0..grants {
        let out = agents[0].get(&["x509", "--role", "dev", "--out", &dir]);
        assert!(out.status.success(), "grant: {}", String::from_utf8_lossy(&out.stderr));
    }
    #[allow(clippy::cast_precision_loss)]
    let per_grant =
        (xacts(&fleet) - before - 1.0 - idle_with_agents * started.elapsed().as_secs_f64()).max(0.0) / grants as f64;
    let mut seen_ms = Vec::new();
    for (i, agent) in agents.iter_mut().enumerate() {
        // From the start of `grantline nodes revoke` at A (a process start,
        // the admin call, the database commit) to the agent reading the
        // close from C.
        let asked = Instant::now();
        let out = fleet.brokers[0].admin(&["nodes", "revoke", &format!("bench-{i}"), "--reason", "bench"]);
        assert!(out.status.success(), "revoke: {}", String::from_utf8_lossy(&out.stderr));
        agent.wait_line("grantline-agent revoked:");
        seen_ms.push(asked.elapsed().as_secs_f64() * 1000.0);
    }
    seen_ms.sort_by(f64::total_cmp);
    let body = scrape(&metrics);
    let q = |p: &str| metric(&body, &format!("grantline_fleet_revocation_delay_seconds{{quantile=\"{p}\"}}")) * 1000.0;
    let report = serde_json::json!({
        "brokers": 3,
        "nodes": nodes,
        "revocation_at_broker_ms": {"p50": q("0.5"), "p99": q("0.99"), "max": q("1"),
            "count": metric(&body, "grantline_fleet_revocation_delay_seconds_count")},
        "revocation_seen_by_agent_ms": {"p50": percentile(&seen_ms, 0.5), "p99": percentile(&seen_ms, 0.99),
            "max": seen_ms.last().copied().unwrap_or(0.0)},
        "db_xacts_per_s_idle": {"no_brokers": without_brokers, "agents_0": idle_without_agents,
            format!("agents_{nodes}"): idle_with_agents},
        "db_xacts_per_grant": per_grant,
    });
    println!("{report}");
    drop(agents);
    fleet.brokers.clear();
}
