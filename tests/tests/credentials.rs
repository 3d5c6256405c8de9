//! enroll → get x509 / get ssh against a real broker and agent, checked by
//! `openssl` and `ssh-keygen`; a request outside policy is denied and audited.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use grantline_proto::audit::Event;
use grantline_tests::in_process::InProcessBroker;
use grantline_tests::{mode, pem_fingerprint, stderr, Agent, Broker, BrokerSide};

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[test]
fn x509_leaf_verifies_with_openssl_and_matches_request_and_policy() {
    x509_grant(&Broker::start());
}

/// The same grant from a broker the test runs in-process (`Broker::open`
/// and `Broker::run` with a shutdown handle), which then stops cleanly and
/// leaves a log that verifies.
#[test]
fn x509_grant_from_an_in_process_broker() {
    let mut broker = InProcessBroker::start();
    x509_grant(&broker);
    broker.stop().expect("the in-process broker stops cleanly");
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
    assert!(!broker.path("admin.sock").exists(), "the admin socket is removed at shutdown");
}

fn x509_grant(broker: &impl BrokerSide) {
    let agent = Agent::start(broker, "web-1");
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    let before = now();
    let got = agent.get(&[
        "x509",
        "--role",
        "dev",
        "--out",
        o,
        "--ttl",
        "5m",
        "--san",
        "web-1.example.com",
        "--san",
        "10.1.2.3",
    ]);
    assert!(got.status.success(), "get x509 failed: {}", stderr(&got));

    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out.path().join("ca.pem"))
        .arg(out.path().join("cert.pem"))
        .output()
        .expect("openssl must be installed (scripts/install-test-deps.sh)");
    assert!(verify.status.success(), "openssl verify: {} {}", String::from_utf8_lossy(&verify.stdout), stderr(&verify));
    // The chain ends at the broker's trust anchor.
    let anchor = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    assert!(std::fs::read_to_string(out.path().join("ca.pem")).unwrap().ends_with(&anchor));

    let pem = std::fs::read(out.path().join("cert.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice()).next().unwrap().unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|g| match g {
            x509_parser::extensions::GeneralName::DNSName(d) => format!("dns:{d}"),
            x509_parser::extensions::GeneralName::IPAddress(b) => {
                format!("ip:{}", std::net::IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()))
            }
            other => format!("other:{other:?}"),
        })
        .collect();
    assert_eq!(sans, ["dns:web-1.example.com", "ip:10.1.2.3"]);
    let not_after = cert.validity().not_after.timestamp();
    assert!((before + 300..=now() + 300).contains(&not_after), "not_after {not_after} is not 5 minutes out");
    assert_eq!(mode(&out.path().join("key.pem")), 0o600);

    // A TTL above the policy's max_ttl (1h) is capped.
    let capped = tempfile::tempdir().unwrap();
    let got = agent.get(&["x509", "--role", "dev", "--out", capped.path().to_str().unwrap(), "--ttl", "5h"]);
    assert!(got.status.success(), "{}", stderr(&got));
    let pem = std::fs::read(capped.path().join("cert.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice()).next().unwrap().unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(cert.validity().not_after.timestamp() <= now() + 3600);

    // Both grants are in the log, by fingerprint, and the log verifies.
    let fp = pem_fingerprint(&out.path().join("cert.pem"));
    let logged = broker.events().into_iter().any(|e| matches!(e, Event::Grant { fingerprint, ttl_seconds: 300, node, .. } if fingerprint == fp && node == "web-1"));
    assert!(logged, "grant of {fp} not in the audit log");
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}

#[test]
fn ssh_certificate_shows_principal_and_validity_in_ssh_keygen() {
    let broker = Broker::start();
    let agent = Agent::start(&broker, "ops-1");
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&[
        "ssh",
        "--role",
        "dev",
        "--principal",
        "alice",
        "--out",
        out.path().to_str().unwrap(),
        "--ttl",
        "10m",
    ]);
    assert!(got.status.success(), "get ssh failed: {}", stderr(&got));
    assert_eq!(mode(&out.path().join("id_ed25519")), 0o600);

    let listing = Command::new("ssh-keygen")
        .arg("-L")
        .arg("-f")
        .arg(out.path().join("id_ed25519-cert.pub"))
        .output()
        .expect("ssh-keygen must be installed (scripts/install-test-deps.sh)");
    assert!(listing.status.success(), "{}", stderr(&listing));
    let text = String::from_utf8(listing.stdout).unwrap();
    assert!(text.contains("user certificate"), "{text}");
    let principals = text.split("Principals:").nth(1).unwrap().split("Critical").next().unwrap();
    assert_eq!(principals.split_whitespace().collect::<Vec<_>>(), ["alice"], "{text}");

    // "Valid: from 2026-11-24T10:00:00 to 2026-11-24T10:11:00" in local time:
    // check the span is the TTL plus the one-minute backdate.
    let valid = text.lines().find(|l| l.trim_start().starts_with("Valid:")).unwrap();
    let parts: Vec<&str> = valid.split_whitespace().collect();
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    let from = time::PrimitiveDateTime::parse(parts[2], &fmt).unwrap();
    let to = time::PrimitiveDateTime::parse(parts[4], &fmt).unwrap();
    assert_eq!((to - from).whole_seconds(), 660, "{valid}");

    // Signed by the broker's SSH CA.
    let ca = std::fs::read_to_string(broker.path("ssh-ca.pub")).unwrap();
    let fp = Command::new("ssh-keygen").args(["-l", "-f"]).arg(broker.path("ssh-ca.pub")).output().unwrap();
    let ca_fp = String::from_utf8(fp.stdout).unwrap().split_whitespace().nth(1).unwrap().to_owned();
    assert!(text.contains(&ca_fp), "not signed by {ca}: {text}");
}

#[test]
fn request_outside_policy_is_refused_and_audited_as_denial() {
    let broker = Broker::start();
    let agent = Agent::start(&broker, "web-2");
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["x509", "--role", "prod", "--out", out.path().to_str().unwrap()]);
    assert_eq!(got.status.code(), Some(77), "{}", stderr(&got));
    let msg = stderr(&got);
    assert!(
        msg.contains("PERMISSION_DENIED") && msg.contains("no policy rule allows kind x509 with role \"prod\""),
        "{msg}"
    );
    assert!(!out.path().join("cert.pem").exists() && !out.path().join("key.pem").exists());

    let denial = broker.events().into_iter().find_map(|e| match e {
        Event::Denial { action, node, role, reason, caller, policy, .. } if action == "grant" => {
            Some((node, role, reason, caller, policy))
        }
        _ => None,
    });
    let (node, role, reason, caller, policy) = denial.expect("no denial in the audit log");
    assert_eq!((node.as_str(), role.as_str()), ("web-2", "prod"));
    assert!(reason.contains("no policy rule"));
    assert_eq!(policy.len(), 64, "the policy hash is recorded");
    let caller = caller.expect("the local caller is recorded");
    assert_eq!(caller.uid, nix::unistd::getuid().as_raw());
    assert!(caller.exe.ends_with("grantline-agent"), "{}", caller.exe);
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}
