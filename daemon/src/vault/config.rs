//! The `[vault]` section of `grantlined.toml`.
//!
//! ```toml
//! [vault]
//! address = "https://vault.example.com:8200"
//! ca_file = "/etc/grantline/vault-ca.pem"         # optional
//! token_file = "/etc/grantline/vault-token"       # or:
//! approle = { role_id = "…", secret_id_file = "/etc/grantline/vault-secret-id", mount = "approle" }
//! timeout = "10s"                                 # per request
//! pki_mount = "pki"
//! ssh_mount = "ssh"
//! x509 = "vault"         # vault: pki/sign/:role; intermediate: local signing under a Vault-signed intermediate; embedded
//! ssh = "vault"          # vault: ssh/sign/:role; embedded
//! intermediate_ttl = "24h"
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultFile {
    address: String,
    ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    approle: Option<AppRoleFile>,
    timeout: Option<String>,
    pki_mount: Option<String>,
    ssh_mount: Option<String>,
    x509: Option<String>,
    ssh: Option<String>,
    intermediate_ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppRoleFile {
    role_id: String,
    secret_id_file: PathBuf,
    mount: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    Token { file: PathBuf },
    AppRole { mount: String, role_id: String, secret_id_file: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum X509Mode {
    /// `pki/sign/:role` for every leaf.
    Vault,
    /// Leaves signed locally by an intermediate CA that Vault signed.
    Intermediate,
    /// The embedded CA, Vault used for other kinds only.
    Embedded,
}

#[derive(Debug, Clone)]
pub struct VaultConfig {
    pub address: String,
    pub ca_file: Option<PathBuf>,
    pub auth: VaultAuth,
    pub timeout: Duration,
    pub pki_mount: String,
    pub ssh_mount: String,
    pub x509: X509Mode,
    pub ssh_via_vault: bool,
    pub intermediate_ttl: Duration,
}

fn duration(what: &str, s: Option<&str>, default: Duration) -> Result<Duration> {
    match s {
        None => Ok(default),
        Some(s) => {
            humantime::parse_duration(s).with_context(|| format!("vault.{what} {s:?} is not a duration like \"10s\""))
        }
    }
}

fn mount(what: &str, s: Option<String>, default: &str) -> Result<String> {
    let m = s.unwrap_or_else(|| default.to_owned());
    if m.is_empty() || m.starts_with('/') || m.ends_with('/') || m.contains("..") || m.contains(char::is_whitespace) {
        bail!("vault.{what} {m:?} is not a mount path like \"{default}\"");
    }
    Ok(m)
}

impl VaultConfig {
    pub fn from_file(f: VaultFile) -> Result<Self> {
        let url = url::Url::parse(&f.address).with_context(|| {
            format!("vault.address {:?} is not a URL like https://vault.example.com:8200", f.address)
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("vault.address must be http:// or https://, not {}", url.scheme());
        }
        let auth = match (f.token_file, f.approle) {
            (Some(file), None) => VaultAuth::Token { file },
            (None, Some(a)) => {
                if a.role_id.is_empty() {
                    bail!("vault.approle.role_id is empty");
                }
                VaultAuth::AppRole {
                    mount: mount("approle.mount", a.mount, "approle")?,
                    role_id: a.role_id,
                    secret_id_file: a.secret_id_file,
                }
            }
            (Some(_), Some(_)) => bail!("vault: set token_file or approle, not both"),
            (None, None) => bail!("vault: set token_file or approle so the broker can log in"),
        };
        let x509 = match f.x509.as_deref().unwrap_or("vault") {
            "vault" => X509Mode::Vault,
            "intermediate" => X509Mode::Intermediate,
            "embedded" => X509Mode::Embedded,
            other => bail!("vault.x509 {other:?} is not one of vault, intermediate, embedded"),
        };
        let ssh_via_vault = match f.ssh.as_deref().unwrap_or("vault") {
            "vault" => true,
            "embedded" => false,
            other => bail!("vault.ssh {other:?} is not one of vault, embedded"),
        };
        let timeout = duration("timeout", f.timeout.as_deref(), Duration::from_secs(10))?;
        if timeout.is_zero() || timeout > Duration::from_secs(120) {
            bail!("vault.timeout must be between 1ms and 2 minutes");
        }
        let intermediate_ttl =
            duration("intermediate_ttl", f.intermediate_ttl.as_deref(), Duration::from_secs(24 * 3600))?;
        if intermediate_ttl < Duration::from_secs(10) {
            bail!("vault.intermediate_ttl must be at least 10s");
        }
        Ok(Self {
            address: f.address,
            ca_file: f.ca_file,
            auth,
            timeout,
            pki_mount: mount("pki_mount", f.pki_mount, "pki")?,
            ssh_mount: mount("ssh_mount", f.ssh_mount, "ssh")?,
            x509,
            ssh_via_vault,
            intermediate_ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VaultConfig> {
        VaultConfig::from_file(toml::from_str(text)?)
    }

    #[test]
    fn valid_and_invalid_sections() {
        let c = parse("address = 'http://127.0.0.1:8200'\ntoken_file = '/t'\n").unwrap();
        assert_eq!((c.x509, c.ssh_via_vault, c.pki_mount.as_str()), (X509Mode::Vault, true, "pki"));
        let c = parse("address = 'https://v:8200'\napprole = { role_id = 'r', secret_id_file = '/s' }\nx509 = 'intermediate'\nssh = 'embedded'\n").unwrap();
        assert_eq!(
            c.auth,
            VaultAuth::AppRole { mount: "approle".into(), role_id: "r".into(), secret_id_file: "/s".into() }
        );
        assert_eq!((c.x509, c.ssh_via_vault), (X509Mode::Intermediate, false));
        for (text, want) in [
            ("address = 'nowhere'\ntoken_file = '/t'\n", "not a URL"),
            ("address = 'ftp://v'\ntoken_file = '/t'\n", "http:// or https://"),
            ("address = 'http://v'\n", "set token_file or approle"),
            ("address = 'http://v'\ntoken_file = '/t'\nx509 = 'acme'\n", "vault.x509"),
            ("address = 'http://v'\ntoken_file = '/t'\npki_mount = '/pki'\n", "mount path"),
            ("address = 'http://v'\ntoken_file = '/t'\ntimeout = 'soon'\n", "vault.timeout"),
            ("address = 'http://v'\ntoken_file = '/t'\nsecret = 'x'\n", "unknown field"),
        ] {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
