//! `grantline-agent get`: generate a key here, ask the running agent for a
//! certificate, check that it certifies our key, and write the files
//! atomically, private keys 0600.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grantline_proto::files::{write_atomic, write_secret};
use grantline_proto::kind::Kind;
use grantline_proto::wire::{self, local_request::Body as LocalReq, local_response::Body as LocalResp};

use crate::credentials;
use crate::local::request;

/// The agent or broker said no; kept apart so the CLI can pick an exit code.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub wire::Error);

/// What every `get` says: the role, where to write, the agent's socket and
/// the lifetime wanted (policy caps it; None: the role's default).
pub struct Ask {
    pub role: String,
    pub out: PathBuf,
    pub socket: PathBuf,
    pub ttl: Option<Duration>,
}

/// A credential written: the reply, and the files, for the caller to report.
pub struct Written {
    pub response: wire::GrantResponse,
    /// `DIR/first, second, …`.
    pub files: String,
}

impl Ask {
    fn written(&self, response: wire::GrantResponse, files: &str) -> Written {
        Written { response, files: format!("{}/{files}", self.out.display()) }
    }

    /// Asks the running agent for `request` (its kind and what the kind
    /// needs) under this role and lifetime, once the output directory is
    /// there.
    async fn grant(&self, kind: Kind, request: wire::GrantRequest) -> Result<wire::GrantResponse> {
        prepare_out(&self.out)?;
        let g = wire::GrantRequest {
            kind: kind.wire() as i32,
            role: self.role.clone(),
            ttl_seconds: ttl_seconds(self.ttl)?,
            ..request
        };
        grant(&self.socket, g).await
    }
}

fn ttl_seconds(ttl: Option<Duration>) -> Result<u32> {
    match ttl {
        None => Ok(0),
        Some(d) => {
            u32::try_from(d.as_secs()).ok().filter(|s| *s > 0).context("--ttl must be between 1 s and 136 years")
        }
    }
}

async fn grant(socket: &Path, g: wire::GrantRequest) -> Result<wire::GrantResponse> {
    let resp = request(socket, &wire::LocalRequest { body: Some(LocalReq::Grant(g)) }).await?;
    match resp.body {
        Some(LocalResp::Grant(gr)) => Ok(gr),
        Some(LocalResp::Error(e)) => Err(Refused(e).into()),
        _ => bail!("the agent answered with an unexpected message"),
    }
}

fn prepare_out(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create output directory {}", out.display()))
}

/// An X.509 certificate: writes `cert.pem`, `key.pem` (0600) and `ca.pem`.
pub async fn get_x509(ask: &Ask, sans: Vec<String>) -> Result<Written> {
    let (key, csr_der) = credentials::x509_key_and_csr(&sans)?;
    let gr = ask.grant(Kind::X509, wire::GrantRequest { csr_der, sans, ..Default::default() }).await?;
    credentials::check_x509(&gr, &key)?;
    write_secret(&ask.out.join("key.pem"), key.serialize_pem().as_bytes())?;
    write_atomic(&ask.out.join("cert.pem"), gr.cert_pem.as_bytes(), 0o644)?;
    write_atomic(&ask.out.join("ca.pem"), gr.chain_pem.as_bytes(), 0o644)?;
    Ok(ask.written(gr, "cert.pem, key.pem, ca.pem"))
}

/// An SSH user (or host) certificate: writes `id_ed25519` (0600),
/// `id_ed25519.pub` and `id_ed25519-cert.pub`.
pub async fn get_ssh(ask: &Ask, principals: Vec<String>, host: bool) -> Result<Written> {
    let (key, public) = credentials::ssh_key()?;
    let kind = if host { Kind::SshHost } else { Kind::SshUser };
    let request = wire::GrantRequest { ssh_public_key: public.clone(), principals, ..Default::default() };
    let gr = ask.grant(kind, request).await?;
    credentials::check_ssh(&gr, &key)?;
    write_secret(&ask.out.join("id_ed25519"), &credentials::ssh_key_file(&key)?)?;
    write_atomic(&ask.out.join("id_ed25519.pub"), format!("{public}\n").as_bytes(), 0o644)?;
    write_atomic(&ask.out.join("id_ed25519-cert.pub"), &credentials::ssh_cert_file(&gr), 0o644)?;
    Ok(ask.written(gr, "id_ed25519, id_ed25519.pub, id_ed25519-cert.pub"))
}

/// A Vault token: writes `token` (0600) and `token.json` (accessor, expiry; 0600).
pub async fn get_token(ask: &Ask, policies: Vec<String>, uses: u32) -> Result<Written> {
    let request = wire::GrantRequest { vault_policies: policies.clone(), num_uses: uses, ..Default::default() };
    let gr = ask.grant(Kind::VaultToken, request).await?;
    if gr.vault_token.is_empty() {
        bail!("the reply holds no token");
    }
    write_secret(&ask.out.join("token"), format!("{}\n", gr.vault_token).as_bytes())?;
    let meta = serde_json::json!({
        "accessor": gr.token_accessor,
        "policies": policies,
        "not_after_unix": gr.not_after_unix,
    });
    write_secret(&ask.out.join("token.json"), format!("{meta:#}\n").as_bytes())?;
    Ok(ask.written(gr, "token, token.json"))
}

/// A dynamic secret: writes `secret.json` (0600) with the data, lease id and expiry.
pub async fn get_secret(ask: &Ask) -> Result<Written> {
    let gr = ask.grant(Kind::DynamicSecret, wire::GrantRequest::default()).await?;
    let data: serde_json::Value = serde_json::from_str(&gr.secret_json).context("the secret is not JSON")?;
    let doc = serde_json::json!({ "data": data, "lease_id": gr.lease_id, "not_after_unix": gr.not_after_unix });
    write_secret(&ask.out.join("secret.json"), format!("{doc:#}\n").as_bytes())?;
    let files = format!("secret.json (lease {})", gr.lease_id);
    Ok(ask.written(gr, &files))
}

/// Gives a dynamic secret back: the broker revokes its lease.
pub async fn release(socket: &Path, lease_id: &str) -> Result<()> {
    let req =
        wire::LocalRequest { body: Some(LocalReq::Release(wire::ReleaseRequest { lease_id: lease_id.to_owned() })) };
    match request(socket, &req).await?.body {
        Some(LocalResp::Release(_)) => Ok(()),
        Some(LocalResp::Error(e)) => Err(Refused(e).into()),
        _ => bail!("the agent answered with an unexpected message"),
    }
}
