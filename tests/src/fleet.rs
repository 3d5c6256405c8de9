//! A fleet of real brokers sharing a real PostgreSQL server (RFD 0010): a
//! fleet root made by `grantlined fleet init`, each broker's state
//! directory by `grantlined fleet join`, each started from its own
//! grantlined.toml naming the shared database.

use std::path::Path;
use std::process::Command;

use crate::postgres::{Postgres, SUPERUSER_PASSWORD};
use crate::{bin, Broker};

/// A policy that lets every node ask for an X.509 leaf of role "dev".
pub const POLICY: &str = r#"
[[rule]]
name = "dev"
nodes = ["*"]

[[rule.allow]]
kinds = ["x509"]
roles = ["dev"]
max_ttl = "1h"
default_ttl = "10m"
sans = ["*"]
"#;

pub struct Fleet {
    pub pg: Postgres,
    pub root: tempfile::TempDir,
    pub brokers: Vec<Broker>,
    /// Appended to every broker's grantlined.toml.
    pub extra: String,
    /// Every broker's policy.
    pub policy: String,
}

/// Runs `grantlined` with `args`, asserting that it succeeds.
pub fn grantlined(args: &[&str], dir: &Path) {
    let out = Command::new(bin("grantlined")).args(args).arg(dir).output().unwrap();
    assert!(out.status.success(), "grantlined {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl Fleet {
    /// `n` brokers on one database; `extra` goes into each configuration.
    pub fn start(n: usize, extra: &str) -> Self {
        Self::start_with(n, POLICY, extra)
    }

    /// [`Fleet::start`] with every broker on `policy`.
    pub fn start_with(n: usize, policy: &str, extra: &str) -> Self {
        let pg = Postgres::start();
        let root = tempfile::tempdir().unwrap();
        grantlined(&["fleet", "init", "--dir"], root.path());
        let password = root.path().join("db-password");
        grantline_proto::files::write_secret(&password, SUPERUSER_PASSWORD.as_bytes()).unwrap();
        // One anchor for the fleet, each broker under its origin's prefix.
        let extra = format!(
            "anchor = \"{}\"\nanchor_heartbeat = \"1s\"\n[state]\nurl = \"{}\"\npassword_file = \"{}\"\npool_size = 4\n{extra}",
            root.path().join("anchor").display(),
            pg.url(),
            password.display()
        );
        let mut fleet = Self { pg, root, brokers: Vec::new(), extra, policy: policy.to_owned() };
        for _ in 0..n {
            fleet.add();
        }
        fleet
    }

    /// Joins one more broker and starts it.
    pub fn add(&mut self) -> &Broker {
        let i = self.brokers.len();
        let dir = tempfile::tempdir().unwrap();
        let origin = format!("grantline.test/broker-{i}");
        let out = Command::new(bin("grantlined"))
            .args(["fleet", "join", "--origin", &origin, "--root"])
            .arg(self.root.path())
            .arg("--state-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "fleet join failed: {}", String::from_utf8_lossy(&out.stderr));
        self.brokers.push(Broker::start_config_in(dir, &origin, &self.policy, &self.extra));
        &self.brokers[i]
    }

    /// The fleet's shared anchor.
    pub fn anchor(&self) -> std::path::PathBuf {
        self.root.path().join("anchor")
    }

    /// `grantline audit verify-fleet --anchor` over the shared anchor, for
    /// the brokers whose verifier keys are in `brokers` (a file).
    pub fn verify_anchor(&self, brokers: &Path, max_age: &str) -> serde_json::Value {
        let out = Command::new(bin("grantline"))
            .args(["audit", "verify-fleet", "--json", "--max-age", max_age, "--anchor"])
            .arg(self.anchor())
            .arg("--brokers")
            .arg(brokers)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("verify-fleet printed no verdict: {}", String::from_utf8_lossy(&out.stderr)))
    }

    /// Every broker's address, as an agent's `--broker` list.
    pub fn addresses(&self) -> String {
        self.brokers.iter().map(|b| b.addr.as_str()).collect::<Vec<_>>().join(",")
    }
}

/// Enrolls a node at `brokers` (one address or a list) with `token`.
pub fn enroll(brokers: &str, ca: &Path, token: &str, name: &str) -> (crate::Agent, std::process::Output) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("grantline-agent"))
        .args(["enroll", "--broker", brokers, "--token", token, "--ca-file"])
        .arg(ca)
        .arg("--state-dir")
        .arg(dir.path())
        .args(["--name", name])
        .output()
        .unwrap();
    (crate::Agent { dir, proc: None }, out)
}

/// Points an enrolled agent at other brokers (its agent.json).
pub fn set_brokers(agent: &crate::Agent, brokers: &str) {
    let path = agent.dir.path().join("agent.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg["broker"] = serde_json::Value::String(brokers.to_owned());
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
}
