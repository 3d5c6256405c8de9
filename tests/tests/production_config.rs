//! `grantlined --config FILE`: a production configuration is validated before
//! anything binds, and a valid one serves agents end to end.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use grantline_tests::{bin, grantline, stderr, Proc};

const POLICY: &str = r#"
[[rule]]
name = "web"
nodes = ["web-*"]
labels = { env = "prod" }

[[rule.allow]]
kinds = ["x509"]
roles = ["web"]
max_ttl = "30m"
sans = ["{node}.example.com"]
"#;

fn write_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("policy.toml"), POLICY).unwrap();
    let cfg = dir.join("grantlined.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\npolicy = \"{}\"\norigin = \"grantline.test/prod\"\nserver_names = [\"127.0.0.1\"]\n{extra}\n[admin]\nsocket = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            dir.join("state").display(),
            dir.join("policy.toml").display(),
            dir.join("admin.sock").display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn invalid_configs_exit_78_with_the_reason_and_bind_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("node_identity_ttl = \"forever\"\n", "node_identity_ttl"),
        ("colour = \"blue\"\n", "unknown field `colour`"),
        // Without credentials, object_store would ask a cloud metadata address.
        ("anchor = \"s3://grantline-audit/logs\"\n", "AWS_ACCESS_KEY_ID"),
        ("anchor = \"s3://b/l\"\nanchor_options_file = \"/nonexistent/anchor.env\"\n", "/nonexistent/anchor.env"),
        ("anchor_heartbeat = \"0s\"\n", "anchor_heartbeat"),
    ];
    for (extra, want) in cases {
        let cfg = write_config(dir.path(), extra);
        let out = Command::new(bin("grantlined"))
            .arg("--config")
            .arg(&cfg)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{extra}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{extra}: {}", stderr(&out));
        assert!(!dir.path().join("state").exists(), "state created despite a bad config");
    }
    // A policy that does not parse is refused too, naming the rule.
    let cfg = write_config(dir.path(), "");
    std::fs::write(dir.path().join("policy.toml"), "[[rule]]\nname = \"x\"\n").unwrap();
    let out = Command::new(bin("grantlined")).arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("rule \"x\"") && stderr(&out).contains("allows nothing"), "{}", stderr(&out));

    let missing = Command::new(bin("grantlined")).args(["--config", "/nonexistent/grantlined.toml"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(78));
    assert!(stderr(&missing).contains("/nonexistent/grantlined.toml"));
}

/// A key file others can read is a configuration error (78, not 69: nothing
/// is unavailable, the admin must fix a mode), named with the fix.
#[test]
fn a_loosely_permitted_key_file_is_a_config_error() {
    use std::os::unix::fs::PermissionsExt;
    let mut broker = grantline_tests::Broker::start();
    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    broker.proc.wait();
    std::fs::set_permissions(broker.path("audit.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(bin("grantlined"))
        .args(["dev", "--state-dir"])
        .arg(broker.dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
}

#[test]
fn production_broker_enrolls_with_pinned_name_and_labels_and_applies_its_policy() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let mut broker = Proc::spawn("grantlined", Command::new(bin("grantlined")).arg("--config").arg(&cfg));
    let addr = broker.wait_line("grantlined ready on");
    let state = dir.path().join("state");

    // Token creation finds the admin socket through the same config file.
    let out = grantline(
        &["token", "create", "--config", cfg.to_str().unwrap(), "--node", "web-7", "--label", "env=prod"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let agent_dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("grantline-agent"))
        .args(["enroll", "--broker", &addr, "--token", &token, "--ca-file"])
        .arg(state.join("ca.pem"))
        .arg("--state-dir")
        .arg(agent_dir.path())
        .args(["--name", "something-else"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("node web-7"), "the token pins the name");

    let socket = agent_dir.path().join("agent.sock");
    let mut agent = Proc::spawn(
        "grantline-agent",
        Command::new(bin("grantline-agent"))
            .args(["run", "--state-dir"])
            .arg(agent_dir.path())
            .arg("--socket")
            .arg(&socket),
    );
    agent.wait_line("grantline-agent connected to");
    let get = |san: &str| {
        let out = tempfile::tempdir().unwrap();
        Command::new(bin("grantline-agent"))
            .args(["get", "x509", "--role", "web", "--san", san, "--out", out.path().to_str().unwrap(), "--socket"])
            .arg(&socket)
            .output()
            .unwrap()
    };
    let ok = get("web-7.example.com");
    assert!(ok.status.success(), "{}", stderr(&ok));
    let denied = get("web-8.example.com");
    assert_eq!(denied.status.code(), Some(77));
    assert!(stderr(&denied).contains("web-8.example.com"), "{}", stderr(&denied));

    let vkey = std::fs::read_to_string(state.join("audit.vkey")).unwrap();
    assert!(vkey.starts_with("grantline.test/prod+"), "{vkey}");
    let (ok, v) = grantline_tests::verify_db(&state.join("audit.db"), &state.join("audit.vkey"));
    assert!(ok, "{v}");
}
