//! Vault/OpenBao backends against a real OpenBao dev server, with real
//! PostgreSQL, sshd, openssl and psql as peers.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use grantline_proto::audit::Event;
use grantline_tests::openbao::{database_secret, OpenBao};
use grantline_tests::postgres::Postgres;
use grantline_tests::sshd::Sshd;
use grantline_tests::vault_proxy::{Fault, VaultProxy};
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
    broker_with_approle(bao, POLICY, &role_id, &secret_id, extra)
}

fn broker_with_approle(bao: &OpenBao, policy: &str, role_id: &str, secret_id: &str, extra: &str) -> Broker {
    broker_at(&bao.addr, policy, role_id, secret_id, extra)
}

/// A broker that reaches Vault at `address` (for example through a [`VaultProxy`]).
fn broker_at(address: &str, policy: &str, role_id: &str, secret_id: &str, extra: &str) -> Broker {
    let secrets = tempfile::tempdir().unwrap().keep();
    let secret_file = secrets.join("secret-id");
    grantline_proto::files::write_secret(&secret_file, secret_id.as_bytes()).unwrap();
    Broker::start_config(
        policy,
        &format!(
            "[vault]\naddress = \"{address}\"\napprole = {{ role_id = \"{role_id}\", secret_id_file = \"{}\" }}\ntimeout = \"2s\"\n{extra}",
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
    let got = agent.get(&[
        "x509",
        "--role",
        "web",
        "--san",
        "api.example.com",
        "--ttl",
        "20m",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(got.status.success(), "{}", stderr(&got));
    let v = openssl_verify(&root, out.path());
    assert!(v.status.success(), "openssl verify: {}{}", String::from_utf8_lossy(&v.stdout), stderr(&v));
    // Issued by Vault: the issuer is the Vault root, not the embedded CA.
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-issuer", "-in"])
        .arg(out.path().join("cert.pem"))
        .output()
        .unwrap();
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
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-issuer", "-in"])
        .arg(out.path().join("cert.pem"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("Grantline intermediate CA"), "{:?}", text);
    let rotations: Vec<_> = broker.events().into_iter().filter(|e| matches!(e, Event::CaRotation { .. })).collect();
    assert_eq!(rotations.len(), 1, "{rotations:?}");
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");

    // SIGTERM stops it cleanly, rotation task and all.
    let mut broker = broker;
    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = broker.proc.wait_at_most(std::time::Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "grantlined did not stop on SIGTERM in intermediate mode: {status:?}");
}

/// The serial of the CA that issued the certificate in `dir/cert.pem`
/// (its authority key identifier).
fn issuer_key_id(dir: &std::path::Path) -> Vec<u8> {
    let pem = std::fs::read(dir.join("cert.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice()).next().unwrap().unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .unwrap()
}

#[test]
fn intermediate_is_rotated_before_it_expires_and_leaves_never_outlive_it() {
    let bao = OpenBao::start();
    let root = bao.setup_pki();
    // A 15 s intermediate is rotated 10 s after it was issued.
    let broker = broker_with_vault(&bao, "x509 = \"intermediate\"\nintermediate_ttl = \"15s\"\n");
    let agent = Agent::start(&broker, "web-3");
    let first = tempfile::tempdir().unwrap();
    let got = agent.get(&[
        "x509",
        "--role",
        "web",
        "--san",
        "a.example.com",
        "--ttl",
        "30m",
        "--out",
        first.path().to_str().unwrap(),
    ]);
    assert!(got.status.success(), "{}", stderr(&got));
    let pem = std::fs::read(first.path().join("cert.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice()).next().unwrap().unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let rotations =
        || broker.events().into_iter().filter(|e| matches!(e, Event::CaRotation { .. })).collect::<Vec<_>>();
    let Event::CaRotation { not_after: ca_not_after, .. } = rotations()[0].clone() else { unreachable!() };
    assert!(cert.validity().not_after.timestamp() <= ca_not_after, "the leaf outlives its intermediate");

    // The next rotation is due two thirds into the intermediate's 15 s, not
    // before (Vault backdates not_before by 30 s; that must not count).
    assert_eq!(rotations().len(), 1, "rotated again at once");
    // Wait (bounded) for the rotation to be in the log.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while rotations().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no rotation within 30 s");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let second = tempfile::tempdir().unwrap();
    let got = agent.get(&["x509", "--role", "web", "--san", "b.example.com", "--out", second.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
    let v = openssl_verify(&root, second.path());
    assert!(v.status.success(), "openssl verify after rotation: {}{}", String::from_utf8_lossy(&v.stdout), stderr(&v));
    assert_ne!(
        issuer_key_id(first.path()),
        issuer_key_id(second.path()),
        "the second leaf was not signed by the new intermediate"
    );
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}

fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid()).unwrap().unwrap().name
}

#[test]
fn ssh_certificate_from_vault_logs_in_to_sshd_until_it_expires() {
    let bao = OpenBao::start();
    let ca = bao.setup_ssh();
    let sshd = Sshd::start(&ca);
    let broker = broker_with_vault(&bao, "x509 = \"embedded\"\n");
    let agent = Agent::start(&broker, "ops-1");
    let user = current_user();
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&[
        "ssh",
        "--role",
        "ops",
        "--principal",
        &user,
        "--ttl",
        "4s",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(got.status.success(), "{}", stderr(&got));
    let key = out.path().join("id_ed25519");
    let cert = out.path().join("id_ed25519-cert.pub");
    let login = sshd.login(&user, &key, &cert);
    assert!(login.status.success(), "ssh login with a fresh certificate failed: {}", stderr(&login));

    // Wait out the certificate's validity (read from the certificate), then the
    // same login is refused.
    let listing = Command::new("ssh-keygen").arg("-L").arg("-f").arg(&cert).output().unwrap();
    let text = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert!(text.contains("Signing CA: ED25519"), "{text}");
    let valid_before = ssh_valid_before(&cert);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(valid_before <= now + 5, "certificate valid past its 4 s TTL: {text}");
    std::thread::sleep(std::time::Duration::from_secs(valid_before.saturating_sub(now) + 1));
    let login = sshd.login(&user, &key, &cert);
    assert!(!login.status.success(), "an expired certificate still logs in");
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}

/// The certificate's valid-before time, from its own bytes.
fn ssh_valid_before(path: &std::path::Path) -> u64 {
    ssh_key::Certificate::read_file(path).unwrap().valid_before()
}

#[test]
fn vault_token_has_the_capped_ttl_uses_and_policies() {
    let bao = OpenBao::start();
    bao.put_policy("app-read", "path \"secret/data/app/*\" { capabilities = [\"read\"] }");
    let broker = broker_with_vault(&bao, "x509 = \"embedded\"\nssh = \"embedded\"\n");
    let agent = Agent::start(&broker, "app-1");
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&[
        "token",
        "--role",
        "app",
        "--policy",
        "app-read",
        "--ttl",
        "2h",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(got.status.success(), "{}", stderr(&got));
    assert_eq!(grantline_tests::mode(&out.path().join("token")), 0o600);
    let token = std::fs::read_to_string(out.path().join("token")).unwrap().trim().to_owned();

    // The token carries only the policies granted (not even `default`), so it
    // is looked up with the root token.
    let lookup = bao.cli(grantline_tests::openbao::ROOT_TOKEN, &["token", "lookup", "-format=json", &token]);
    assert!(lookup.status.success(), "bao token lookup: {}", stderr(&lookup));
    let info: serde_json::Value = serde_json::from_slice(&lookup.stdout).unwrap();
    let data = &info["data"];
    let ttl = data["ttl"].as_u64().unwrap();
    assert!(ttl <= 900 && ttl > 800, "TTL {ttl} is not capped at the policy's 15 minutes");
    assert_eq!(data["policies"], json!(["app-read"]));
    assert_eq!(data["orphan"], json!(true));
    assert_eq!(data["num_uses"], json!(7), "uses are capped by the rule's max_uses");

    // The log names the token by a fingerprint of its accessor, never the token.
    let accessor = data["accessor"].as_str().unwrap();
    let fp = grantline_proto::audit::event::vault_fingerprint("token-accessor", accessor);
    assert!(broker
        .events()
        .iter()
        .any(|e| matches!(e, Event::Grant { fingerprint, kind, .. } if *fingerprint == fp && kind == "vault-token")));
    let db = std::fs::read(broker.path("audit.db")).unwrap();
    for secret in [token.as_str(), accessor] {
        assert!(!db.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} is in the audit log");
    }

    // A policy outside the rule is refused.
    let got = agent.get(&["token", "--role", "app", "--policy", "admin", "--out", out.path().to_str().unwrap()]);
    assert_eq!(got.status.code(), Some(77), "{}", stderr(&got));

    // The node releases its token by its accessor; the agent accepts the
    // broker's receipt for it (it once reported a mismatch) and Vault no
    // longer knows the token.
    let released = Command::new(grantline_tests::bin("grantline-agent"))
        .args(["release", "--lease-id", &format!("token-accessor:{accessor}"), "--socket"])
        .arg(agent.socket())
        .output()
        .unwrap();
    assert!(released.status.success(), "{}", stderr(&released));
    let lookup = bao.cli(grantline_tests::openbao::ROOT_TOKEN, &["token", "lookup", &token]);
    assert!(!lookup.status.success(), "the released token still works");
}

#[test]
fn database_credentials_log_in_to_postgres_until_released() {
    let pg = Postgres::start();
    let bao = OpenBao::start();
    bao.setup_database(&pg);
    let broker = broker_with_vault(&bao, "x509 = \"embedded\"\nssh = \"embedded\"\n");
    let agent = Agent::start(&broker, "db-client");
    let (user, password, lease_id) = database_secret(&agent);
    let (user, password, lease_id) = (user.as_str(), password.as_str(), lease_id.as_str());
    assert!(lease_id.starts_with("database/creds/readonly/"), "{lease_id}");

    let psql = pg.psql(user, password, "SELECT current_user");
    assert!(psql.status.success(), "psql with the issued credentials: {}", stderr(&psql));
    assert_eq!(String::from_utf8_lossy(&psql.stdout).trim(), user);

    // The lease is the node's: releasing it revokes it in Vault, and the
    // database user is gone.
    let released = Command::new(grantline_tests::bin("grantline-agent"))
        .args(["release", "--lease-id", lease_id, "--socket"])
        .arg(agent.socket())
        .output()
        .unwrap();
    assert!(released.status.success(), "{}", stderr(&released));
    let psql = pg.psql(user, password, "SELECT 1");
    assert!(!psql.status.success(), "the released credentials still log in");

    let fp = grantline_proto::audit::event::vault_fingerprint("lease", lease_id);
    let events = broker.events();
    assert!(events.iter().any(|e| matches!(e, Event::Grant { fingerprint, .. } if *fingerprint == fp)));
    assert!(events.iter().any(|e| matches!(e, Event::LeaseRevocation { lease, .. } if *lease == fp)));
    let db = std::fs::read(broker.path("audit.db")).unwrap();
    assert!(!db.windows(password.len()).any(|w| w == password.as_bytes()), "the password is in the audit log");
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}

#[test]
fn a_revoked_node_is_disconnected_within_a_second_cannot_reconnect_and_loses_its_leases() {
    let pg = Postgres::start();
    let bao = OpenBao::start();
    bao.setup_database(&pg);
    bao.put_policy("app-read", "path \"secret/data/app/*\" { capabilities = [\"read\"] }");
    let broker = broker_with_vault(&bao, "x509 = \"embedded\"\nssh = \"embedded\"\n");
    let mut agent = Agent::start(&broker, "db-client");
    let bystander = Agent::start(&broker, "other");
    let (user, password, lease_id) = database_secret(&agent);
    assert!(pg.psql(&user, &password, "SELECT 1").status.success());
    let token_dir = tempfile::tempdir().unwrap();
    let got =
        agent.get(&["token", "--role", "app", "--policy", "app-read", "--out", token_dir.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
    let token = std::fs::read_to_string(token_dir.path().join("token")).unwrap().trim().to_owned();
    // The token carries no `default` policy, so it is looked up as root.
    let token_alive =
        || bao.cli(grantline_tests::openbao::ROOT_TOKEN, &["token", "lookup", "-format=json", &token]).status.success();
    assert!(token_alive());

    // Revoke while the agent is connected, and time how long until the
    // agent is told: the command runs on another thread.
    let started = std::time::Instant::now();
    let socket = broker.admin_socket();
    let admin = std::thread::scope(|s| {
        let revoke = s.spawn(|| {
            Command::new(grantline_tests::bin("grantline"))
                .args(["nodes", "revoke", "db-client", "--reason", "stolen", "--json", "--socket"])
                .arg(&socket)
                .output()
                .unwrap()
        });
        let line = agent.wait_line("grantline-agent revoked:");
        let elapsed = started.elapsed();
        eprintln!("revocation reached the agent {elapsed:?} after 'grantline nodes revoke' started");
        assert!(elapsed < std::time::Duration::from_secs(1), "the agent was told after {elapsed:?}");
        assert!(line.contains("stolen"), "{line}");
        revoke.join().unwrap()
    });
    assert!(admin.status.success(), "{}", stderr(&admin));
    let report: serde_json::Value = serde_json::from_slice(&admin.stdout).unwrap();
    assert_eq!(report["was_connected"], true, "{report}");
    assert_eq!(report["leases_revoked"], 2, "the database lease and the Vault token: {report}");

    // Vault revoked both: the database user is gone, the token is dead.
    assert!(!pg.psql(&user, &password, "SELECT 1").status.success(), "the revoked node's credentials still log in");
    assert!(!token_alive(), "the revoked node's token is still alive");

    // Its identity is refused from now on: a new connection is closed with
    // REVOKED, and a request on it never gets a credential.
    let identity = grantline_tests::raw::node_identity(agent.dir.path());
    let ca = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    let rt = grantline_tests::raw::runtime();
    let refused = rt.block_on(async {
        let conn =
            grantline_tests::raw::connect(&broker.addr, grantline_tests::raw::client_config(&ca, Some(identity)))
                .await
                .unwrap();
        let req = grantline_proto::frame::encode(&grantline_proto::wire::Request {
            body: Some(grantline_proto::wire::request::Body::Prove(grantline_proto::wire::ProveRequest { index: 0 })),
        });
        match grantline_tests::raw::send_raw(&conn, &req).await {
            Ok(resp) => format!("{:?}", grantline_tests::raw::error_of(&resp)),
            // Closed before the request was answered: the close says why.
            Err(_) => match conn.closed().await {
                quinn::ConnectionError::ApplicationClosed(close) => {
                    let e: grantline_proto::wire::Error = prost::Message::decode(close.reason.as_ref()).unwrap();
                    assert_eq!(e.code, grantline_proto::wire::ErrorCode::Revoked as i32);
                    e.message
                }
                other => other.to_string(),
            },
        }
    });
    assert!(refused.to_lowercase().contains("revoked"), "{refused}");
    let got = agent.get(&["x509", "--role", "dev", "--out", token_dir.path().to_str().unwrap()]);
    assert_eq!(got.status.code(), Some(77), "{}", stderr(&got));

    // Other nodes are unaffected; the node list says who is revoked.
    let other = tempfile::tempdir().unwrap();
    let ok =
        bystander.get(&["token", "--role", "app", "--policy", "app-read", "--out", other.path().to_str().unwrap()]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let nodes = broker.admin(&["nodes", "list", "--json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&nodes.stdout).unwrap();
    let state = |name: &str| nodes.as_array().unwrap().iter().find(|n| n["name"] == name).unwrap().clone();
    assert_eq!(
        (state("db-client")["revoked"].clone(), state("db-client")["connected"].clone()),
        (json!(true), json!(false))
    );
    assert_eq!((state("other")["revoked"].clone(), state("other")["connected"].clone()), (json!(false), json!(true)));

    let events = broker.events();
    assert!(events.iter().any(|e| matches!(e, Event::NodeRevocation { node, reason, admin, .. }
        if node == "db-client" && reason == "stolen" && admin.uid == nix::unistd::getuid().as_raw())));
    let revoked_leases = events
        .iter()
        .filter(|e| matches!(e, Event::LeaseRevocation { node, reason, .. } if node == "db-client" && reason == "node revoked"))
        .count();
    assert_eq!(revoked_leases, 2);
    let fp = grantline_proto::audit::event::vault_fingerprint("lease", &lease_id);
    let grants = broker.admin(&["grants", "list", "--node", "db-client", "--all", "--json"]);
    let grants: serde_json::Value = serde_json::from_slice(&grants.stdout).unwrap();
    let lease_grant = grants.as_array().unwrap().iter().find(|g| g["fingerprint"] == fp.as_str()).unwrap();
    assert!(lease_grant["revoked_at"].is_string(), "the inventory shows the lease revoked: {lease_grant}");
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}

#[test]
fn vault_outage_fails_vault_kinds_retryably_keeps_embedded_kinds_and_recovers() {
    let bao = OpenBao::start();
    bao.setup_ssh();
    let broker = broker_with_vault(&bao, "x509 = \"embedded\"\n");
    let agent = Agent::start(&broker, "web-ops-2");
    let user = current_user();
    let ssh = |out: &std::path::Path| {
        agent.get(&["ssh", "--role", "ops", "--principal", &user, "--out", out.to_str().unwrap()])
    };
    let x509 = |out: &std::path::Path| {
        agent.get(&["x509", "--role", "web", "--san", "a.example.com", "--out", out.to_str().unwrap()])
    };
    let out = tempfile::tempdir().unwrap();
    assert!(ssh(out.path()).status.success());

    // Vault stops answering (SIGSTOP: requests hang, as with a dead host).
    bao.proc.signal(nix::sys::signal::Signal::SIGSTOP);
    let down = ssh(out.path());
    assert_eq!(down.status.code(), Some(69), "{}", stderr(&down));
    assert!(stderr(&down).contains("UNAVAILABLE") && stderr(&down).contains("retryable"), "{}", stderr(&down));
    // Embedded kinds are served all the while.
    let embedded = x509(out.path());
    assert!(embedded.status.success(), "embedded x509 failed during the Vault outage: {}", stderr(&embedded));

    // Vault returns; the next request succeeds with no restart.
    bao.proc.signal(nix::sys::signal::Signal::SIGCONT);
    let back = ssh(out.path());
    assert!(back.status.success(), "{}", stderr(&back));

    // Sealed Vault: a clear retryable error too, and recovery after unseal.
    let seal = bao.cli(grantline_tests::openbao::ROOT_TOKEN, &["operator", "seal"]);
    assert!(seal.status.success(), "{}", stderr(&seal));
    let sealed = ssh(out.path());
    assert_eq!(sealed.status.code(), Some(69), "{}", stderr(&sealed));
    let unseal = bao.cli(grantline_tests::openbao::ROOT_TOKEN, &["operator", "unseal", &bao.unseal_key]);
    assert!(unseal.status.success(), "{}", stderr(&unseal));
    let back = ssh(out.path());
    assert!(back.status.success(), "{}", stderr(&back));

    // Vault revokes the broker's own token: the broker logs in again by itself.
    bao.api("POST", "sys/leases/revoke-prefix/auth/approle/login", None);
    let relogged = ssh(out.path());
    assert!(relogged.status.success(), "no recovery after the broker's token was revoked: {}", stderr(&relogged));

    // Every failure is in the log as a denial naming Vault.
    let failures = broker
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Denial { reason, .. } if reason.contains("unavailable")))
        .count();
    assert!(failures >= 2, "outages not audited");
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}

/// Review defect 17: every 403 made the broker log in to AppRole again, so a
/// node asking for a path the broker's own Vault policy does not cover spent
/// the secret_id's uses; once they were gone, every Vault kind was down for
/// every node. A 403 on a valid token is now reported, not answered with a login.
#[test]
fn refusals_for_paths_the_broker_may_not_read_do_not_spend_approle_logins() {
    let bao = OpenBao::start();
    let (role_id, _) = bao.setup_broker_approle();
    bao.api("POST", "auth/approle/role/grantline", Some(json!({"secret_id_num_uses": 5})));
    let secret_id = bao.api("POST", "auth/approle/role/grantline/secret-id", None)["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let policy = "[[rule]]\nname = \"kv\"\n[[rule.allow]]\nkinds = [\"secret\"]\nroles = [\"app\"]\nmax_ttl = \"10m\"\npath = \"kv/creds/{role}\"\n";
    let broker = broker_with_approle(&bao, policy, &role_id, &secret_id, "x509 = \"embedded\"\nssh = \"embedded\"\n");
    let agent = Agent::start(&broker, "kv-1");
    for _ in 0..6 {
        let out = tempfile::tempdir().unwrap();
        let got = agent.get(&["secret", "--role", "app", "--out", out.path().to_str().unwrap()]);
        assert!(!got.status.success());
        assert!(stderr(&got).contains("Vault policy does not allow"), "{}", stderr(&got));
    }
    let left = bao.api("POST", "auth/approle/role/grantline/secret-id/lookup", Some(json!({"secret_id": secret_id})));
    assert_eq!(left["data"]["secret_id_num_uses"], json!(4), "one login, not one per refusal: {left}");
}

/// Accessors of the live tokens Vault holds for `node` (the broker puts the
/// node's name in each token's metadata).
fn live_tokens_of(bao: &OpenBao, node: &str) -> Vec<String> {
    let list = bao.api("GET", "auth/token/accessors?list=true", None);
    let accessors: Vec<String> =
        list["data"]["keys"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
    accessors
        .into_iter()
        .filter(|a| {
            bao.api_as(
                grantline_tests::openbao::ROOT_TOKEN,
                "POST",
                "auth/token/lookup-accessor",
                Some(json!({"accessor": a})),
            )
            .is_ok_and(|info| info["data"]["meta"]["node"] == node)
        })
        .collect()
}

/// Polls `done` until it holds or `within` has passed; whether it held.
fn eventually(within: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + within;
    while std::time::Instant::now() < until {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    done()
}

/// A broker behind a proxy to `bao`, with the `apps` rules and an agent `node`.
fn behind_proxy(bao: &OpenBao, node: &str) -> (VaultProxy, Broker, Agent) {
    bao.put_policy("app-read", "path \"secret/data/app/*\" { capabilities = [\"read\"] }");
    let proxy = VaultProxy::start(&bao.addr);
    let (role_id, secret_id) = bao.setup_broker_approle();
    let broker = broker_at(&proxy.addr, POLICY, &role_id, &secret_id, "x509 = \"embedded\"\nssh = \"embedded\"\n");
    let agent = Agent::start(&broker, node);
    (proxy, broker, agent)
}

fn get_token(agent: &Agent) -> std::process::Output {
    let out = tempfile::tempdir().unwrap();
    agent.get(&["token", "--role", "app", "--policy", "app-read", "--out", out.path().to_str().unwrap()])
}

/// Review defect 15: when Vault answered a token creation after the broker's
/// timeout, the broker sent it twice more; each attempt left a token nobody
/// received, known to no one, alive for its TTL. Now the request is sent
/// once, the node is told Vault timed out, and the token Vault answers late
/// with is revoked.
#[test]
fn a_token_vault_answers_after_the_timeout_is_revoked_not_left_behind() {
    let bao = OpenBao::start();
    let (proxy, broker, agent) = behind_proxy(&bao, "late-1");
    proxy.set(Fault {
        path: "auth/token/create-orphan".into(),
        delay: std::time::Duration::from_secs(8),
        ..Fault::default()
    });
    let got = get_token(&agent);
    assert_eq!(got.status.code(), Some(69), "{}", stderr(&got));
    assert!(
        stderr(&got).contains("did not answer within") && stderr(&got).contains("not sent again"),
        "{}",
        stderr(&got)
    );
    // Vault made the token at once; only its answer is held back.
    assert_eq!(live_tokens_of(&bao, "late-1").len(), 1, "one token was created (the request was sent once)");
    assert!(
        eventually(std::time::Duration::from_secs(30), || live_tokens_of(&bao, "late-1").is_empty()),
        "the token Vault answered late is still alive"
    );
    assert_eq!(proxy.hits(), 1, "the request was sent again");
    // The failure is in the log; nothing was granted.
    let events = broker.events();
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Denial { reason, .. } if reason.contains("did not answer within"))));
    assert!(!events.iter().any(|e| matches!(e, Event::Grant { kind, .. } if kind == "vault-token")));

    // With Vault answering in time again, tokens are granted as before.
    proxy.set(Fault::default());
    let got = get_token(&agent);
    assert!(got.status.success(), "{}", stderr(&got));
    assert_eq!(live_tokens_of(&bao, "late-1").len(), 1);
}

/// Review defect 16: an answer the client could not parse was taken for an
/// outage and retried, and each attempt left a token behind. Now it is an
/// internal error, sent once, and the token it names is revoked.
#[test]
fn a_token_answer_the_broker_cannot_use_is_revoked_and_not_retried() {
    let bao = OpenBao::start();
    let (proxy, broker, agent) = behind_proxy(&bao, "odd-1");
    proxy.set(Fault {
        path: "auth/token/create-orphan".into(),
        replace: vec![("\"client_token\"".into(), "\"client_tokeX\"".into())],
        ..Fault::default()
    });
    let got = get_token(&agent);
    assert!(!got.status.success());
    let err = stderr(&got);
    assert!(err.contains("INTERNAL") && err.contains("client_token is missing"), "{err}");
    assert!(err.contains("what Vault created was revoked"), "{err}");
    assert_eq!(proxy.hits(), 1, "an unusable answer was taken for an outage and retried");
    assert!(live_tokens_of(&bao, "odd-1").is_empty(), "the token of an unusable answer is alive");
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}

/// Defect 15 for dynamic secrets: a database user Vault creates after the
/// broker's timeout is revoked, not left to the role's TTL.
#[test]
fn a_database_lease_vault_answers_after_the_timeout_is_revoked() {
    let pg = Postgres::start();
    let bao = OpenBao::start();
    bao.setup_database(&pg);
    let (proxy, _broker, agent) = behind_proxy(&bao, "late-db");
    proxy.set(Fault {
        path: "database/creds/readonly".into(),
        delay: std::time::Duration::from_secs(8),
        ..Fault::default()
    });
    let leases = || {
        bao.api_as(
            grantline_tests::openbao::ROOT_TOKEN,
            "GET",
            "sys/leases/lookup/database/creds/readonly?list=true",
            None,
        )
        .map(|l| l["data"]["keys"].as_array().map_or(0, Vec::len))
        .unwrap_or(0) // 404: no lease under the prefix
    };
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["secret", "--role", "readonly", "--out", out.path().to_str().unwrap()]);
    assert_eq!(got.status.code(), Some(69), "{}", stderr(&got));
    assert_eq!(leases(), 1, "Vault made one database user (the read was sent once)");
    assert!(eventually(std::time::Duration::from_secs(30), || leases() == 0), "the late lease is still alive");
    assert_eq!(proxy.hits(), 1);
}
