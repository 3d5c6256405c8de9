//! The broker and agent over time: identity renewal at half-life, and a clean
//! shutdown on SIGTERM.

#![allow(clippy::unwrap_used)]

use grantline_proto::audit::Event;
use grantline_tests::{stderr, Agent, Broker};

#[test]
fn agent_renews_its_identity_at_half_life_and_keeps_serving() {
    // A 20 s identity: the agent renews between 9 s and 11 s in.
    let broker = Broker::start_with(&["--node-identity-ttl", "20s"]);
    let mut agent = Agent::start(&broker, "renewer");
    let before = std::fs::read_to_string(agent.dir.path().join("node.pem")).unwrap();
    let started = std::time::Instant::now();
    agent.wait_line("grantline-agent identity renewed until");
    let took = started.elapsed().as_secs_f64();
    assert!((8.0..=12.0).contains(&took), "renewed after {took:.1} s, not at half of 20 s ± 10 %");
    agent.wait_connected();
    let after = std::fs::read_to_string(agent.dir.path().join("node.pem")).unwrap();
    assert_ne!(before, after, "node.pem was not replaced");

    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["x509", "--role", "dev", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
    let renewals = broker
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::IdentityRenewal { node, .. } if node == "renewer"))
        .count();
    assert_eq!(renewals, 1);
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}

#[test]
fn sigterm_finishes_and_exits_zero_with_a_sound_log() {
    let mut broker = Broker::start();
    let agent = Agent::start(&broker, "stopper");
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["ssh", "--role", "dev", "--principal", "carol", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = broker.proc.wait();
    assert!(status.success(), "grantlined exited with {status}");
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
    assert_eq!(v["entries"], 4, "genesis, token creation, enrollment, grant: {v}");
}
