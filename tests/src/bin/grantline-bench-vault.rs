//! Grants per second through the broker on the embedded CA, through Vault's
//! `pki/sign`, and in intermediate mode, next to OpenBao's own `pki/sign`
//! rate, all in one run on this machine. Prints one JSON object per scenario
//! and a summary. `cargo run --release -p grantline-tests --bin grantline-bench-vault [REQUESTS]`
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

fn main() {
    let requests: usize = std::env::args().nth(1).map_or(3000, |n| n.parse().unwrap());
    let bao = OpenBao::start();
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
        let token = broker.new_token(&[]);
        let (agent, out) = Agent::enroll_with(&broker, &token, "bench-node");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let load = BrokerLoad {
            broker: broker.addr.clone(),
            ca_pem: std::fs::read_to_string(broker.path("ca.pem")).unwrap(),
            identity_dir: agent.dir.path().to_owned(),
            role: "web".into(),
            san: "svc.example.com".into(),
            // Four requests in flight per connection: the broker allows
            // eight concurrent streams per agent (RFD 0008), and a bench
            // that queues on that limit measures its own connection count.
            connections: 16,
            concurrency: 64,
            requests,
        };
        let r = broker_grants(&load, scenario);
        println!("{r}");
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
    });
    println!("{direct}");
    let base = direct["per_second"].as_f64().unwrap();
    let ratios: serde_json::Map<String, serde_json::Value> = results
        .iter()
        .map(|r| (r["scenario"].as_str().unwrap().to_owned(), json!(r["per_second"].as_f64().unwrap() / base)))
        .collect();
    println!(
        "{}",
        json!({"summary": "grants per second relative to OpenBao pki/sign", "openbao_pki_sign_per_second": base, "ratio": ratios})
    );
}
