//! Grants per second through the broker on the embedded CA, through Vault's
//! `pki/sign`, and in intermediate mode, next to OpenBao's own `pki/sign`
//! rate, all in one run on this machine, with each server's CPU time per
//! credential from /proc (the ratio that holds on any machine). Prints one
//! JSON object per scenario and a summary.
//! `cargo run --release -p grantline-tests --bin grantline-bench-vault [REQUESTS]`
//!
//! With `PIN=1` the servers (broker, OpenBao) run on CPU 0 and this load
//! generator on CPU 1 (`taskset`, every thread), so a rate is per server core.
#![allow(clippy::unwrap_used)]

use grantline_tests::load::{broker_grants, vault_pki, BrokerLoad, VaultLoad};
use grantline_tests::openbao::{OpenBao, ROOT_TOKEN};
use grantline_tests::{Agent, Broker};
use serde_json::json;

const POLICY: &str = r#"
[[rule]]
name = "bench"
[[rule.allow]]
kinds = ["x509"]
roles = ["web"]
max_ttl = "1h"
sans = ["*.example.com"]
"#;

/// Moves every thread of process `pid` to CPU `cpu`, if `PIN=1`.
fn pin(pid: u32, cpu: u32) {
    if std::env::var("PIN").as_deref() == Ok("1") {
        let out = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "taskset: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn main() {
    let requests: usize = std::env::args().nth(1).map_or(3000, |n| n.parse().unwrap());
    pin(std::process::id(), 1);
    let bao = OpenBao::start();
    let bao_pid = u32::try_from(bao.proc.pid()).unwrap();
    pin(bao_pid, 0);
    bao.setup_pki();
    let token_file = tempfile::NamedTempFile::new().unwrap();
    grantline_proto::files::write_secret(token_file.path(), ROOT_TOKEN.as_bytes()).unwrap();
    let mut results = Vec::new();
    for (scenario, vault) in [
        ("broker-embedded", String::new()),
        (
            "broker-vault-sign",
            format!(
                "[vault]\naddress = \"{}\"\ntoken_file = \"{}\"\nx509 = \"vault\"\n",
                bao.addr,
                token_file.path().display()
            ),
        ),
        (
            "broker-vault-intermediate",
            format!(
                "[vault]\naddress = \"{}\"\ntoken_file = \"{}\"\nx509 = \"intermediate\"\n",
                bao.addr,
                token_file.path().display()
            ),
        ),
    ] {
        let broker = Broker::start_config(POLICY, &vault);
        let broker_pid = u32::try_from(broker.proc.pid()).unwrap();
        pin(broker_pid, 0);
        let token = broker.new_token(&[]);
        let (agent, out) = Agent::enroll_with(&broker, &token, "bench-node");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let load = BrokerLoad {
            broker: broker.addr.clone(),
            ca_pem: std::fs::read_to_string(broker.path("ca.pem")).unwrap(),
            identity_dir: agent.dir.path().to_owned(),
            role: "web".into(),
            san: "svc.example.com".into(),
            // As many connections as the broker lets one node hold, six
            // requests in flight on each: it allows eight concurrent streams
            // per connection (RFD 0008), and a bench that queues on that
            // limit measures its own connection count.
            connections: grantline_daemon::registry::MAX_CONNECTIONS_PER_NODE,
            concurrency: 6 * grantline_daemon::registry::MAX_CONNECTIONS_PER_NODE,
            requests,
            broker_pid: Some(broker_pid),
        };
        let r = broker_grants(&load, scenario);
        println!("{r}");
        // A rate of failures is no measurement.
        assert_eq!(r["errors"], json!({}), "{scenario}: grants failed");
        results.push(r);
        let (ok, v) = broker.verify();
        assert!(ok, "{v}");
    }
    let direct = vault_pki(&VaultLoad {
        vault: bao.addr.clone(),
        token: ROOT_TOKEN.into(),
        role: "web".into(),
        san: "svc.example.com".into(),
        concurrency: 64,
        requests,
        vault_pid: Some(bao_pid),
    });
    println!("{direct}");
    assert_eq!(direct["errors"], json!({}), "pki/sign failed");
    let base = direct["per_second"].as_f64().unwrap();
    let bao_cpu = direct["vault_cpu_us_per_sign"].as_f64();
    let by_scenario =
        |f: &dyn Fn(&serde_json::Value) -> serde_json::Value| -> serde_json::Map<String, serde_json::Value> {
            results.iter().map(|r| (r["scenario"].as_str().unwrap().to_owned(), f(r))).collect()
        };
    let ratios = by_scenario(&|r| json!(r["per_second"].as_f64().unwrap() / base));
    // OpenBao's CPU per signature over the broker's per grant: how many
    // times less CPU a credential costs through the broker.
    let cpu_ratios = by_scenario(&|r| json!(bao_cpu.zip(r["broker_cpu_us_per_grant"].as_f64()).map(|(v, b)| v / b)));
    let cpu_per_grant = by_scenario(&|r| r["broker_cpu_us_per_grant"].clone());
    println!(
        "{}",
        json!({
            "summary": "grants per second relative to OpenBao pki/sign, and OpenBao's CPU per credential over the broker's",
            "pinned": std::env::var("PIN").as_deref() == Ok("1"),
            "openbao_pki_sign_per_second": base,
            "ratio": ratios,
            "openbao_cpu_us_per_sign": bao_cpu,
            "broker_cpu_us_per_grant": cpu_per_grant,
            "cpu_ratio": cpu_ratios,
        })
    );
}
