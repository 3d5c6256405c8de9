//! Vault/OpenBao backends against a real OpenBao dev server, with real
//! PostgreSQL, sshd, openssl and psql as peers.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use grantline_proto::audit::Event;
use grantline_tests::openbao::OpenBao;
use grantline_tests::postgres::{Postgres, SUPERUSER_PASSWORD};
use grantline_tests::sshd::Sshd;
use grantline_tests::{stderr, Agent, Broker};
use serde_json::json;

const POLICY: &str = r#"
[[rule]]
name = "web"
nodes = ["web-*"]
[[rule.allow]]
kinds = ["x509"]
roles = ["web"]
max_ttl = "1h"
sans = ["*.example.com"]

[[rule]]
name = "ops"
[[rule.allow]]
kinds = ["ssh-user"]
roles = ["ops"]
max_ttl = "30m"
principals = ["*"]

[[rule]]
name = "apps"
[[rule.allow]]
kinds = ["vault-token"]
roles = ["app"]
max_ttl = "15m"
vault_policies = ["app-*"]
max_uses = 7
[[rule.allow]]
kinds = ["secret"]
roles = ["readonly"]
max_ttl = "10m"
path = "database/creds/{role}"
"#;

/// A broker logging in to `bao` with an AppRole; `extra` adds to `[vault]`.
fn broker_with_vault(bao: &OpenBao, extra: &str) -> Broker {
    let (role_id, secret_id) = bao.setup_broker_approle();
    let secrets = tempfile::tempdir().unwrap().keep();
    let secret_file = secrets.join("secret-id");
    grantline_proto::files::write_secret(&secret_file, secret_id.as_bytes()).unwrap();
    Broker::start_config(
        POLICY,
        &format!(
            "[vault]\naddress = \"{}\"\napprole = {{ role_id = \"{role_id}\", secret_id_file = \"{}\" }}\ntimeout = \"2s\"\n{extra}",
            bao.addr,
            secret_file.display()
        ),
    )
}

fn openssl_verify(root_pem: &str, out: &std::path::Path) -> std::process::Output {
    let root = out.join("vault-root.pem");
    std::fs::write(&root, root_pem).unwrap();
    Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&root)
        .arg("-untrusted")
        .arg(out.join("ca.pem"))
        .arg(out.join("cert.pem"))
        .output()
        .unwrap()
}

#[test]
fn x509_from_vault_pki_sign_verifies_against_the_vault_chain() {
    let bao = OpenBao::start();
    let root = bao.setup_pki();
    let broker = broker_with_vault(&bao, "x509 = \"vault\"\n");
    let agent = Agent::start(&broker, "web-1");
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["x509", "--role", "web", "--san", "api.example.com", "--ttl", "20m", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
    let v = openssl_verify(&root, out.path());
    assert!(v.status.success(), "openssl verify: {}{}", String::from_utf8_lossy(&v.stdout), stderr(&v));
    // Issued by Vault: the issuer is the Vault root, not the embedded CA.
    let text = Command::new("openssl").args(["x509", "-noout", "-issuer", "-in"]).arg(out.path().join("cert.pem")).output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("OpenBao test root"), "{:?}", text);
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}

#[test]
fn x509_in_intermediate_mode_verifies_and_the_rotation_is_audited() {
    let bao = OpenBao::start();
    let root = bao.setup_pki();
    let broker = broker_with_vault(&bao, "x509 = \"intermediate\"\nintermediate_ttl = \"2h\"\n");
    let agent = Agent::start(&broker, "web-2");
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["x509", "--role", "web", "--san", "db.example.com", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
    let v = openssl_verify(&root, out.path());
    assert!(v.status.success(), "openssl verify: {}{}", String::from_utf8_lossy(&v.stdout), stderr(&v));
    let text = Command::new("openssl").args(["x509", "-noout", "-issuer", "-in"]).arg(out.path().join("cert.pem")).output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("Grantline intermediate CA"), "{:?}", text);
    let rotations: Vec<_> = broker.events().into_iter().filter(|e| matches!(e, Event::CaRotation { .. })).collect();
    assert_eq!(rotations.len(), 1, "{rotations:?}");
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}
