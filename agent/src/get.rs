//! `grantline-agent get`: generate a key here, ask the running agent for a
//! certificate, check that it certifies our key, and write the files
//! atomically, private keys 0600.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grantline_proto::files::{write_atomic, write_secret};
use grantline_proto::wire::{self, local_request::Body as LocalReq, local_response::Body as LocalResp};

use crate::credentials;
use crate::local::request;

/// The agent or broker said no; kept apart so the CLI can pick an exit code.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub wire::Error);

pub struct GetX509 {
    pub role: String,
    pub out: PathBuf,
    pub socket: PathBuf,
    pub ttl: Option<Duration>,
    pub sans: Vec<String>,
}

pub struct GetSsh {
    pub role: String,
    pub principals: Vec<String>,
    pub out: PathBuf,
    pub socket: PathBuf,
    pub ttl: Option<Duration>,
    pub host: bool,
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

pub async fn get_x509(args: GetX509) -> Result<wire::GrantResponse> {
    prepare_out(&args.out)?;
    let (key, csr_der) = credentials::x509_key_and_csr(&args.sans)?;
    let gr = grant(
        &args.socket,
        wire::GrantRequest {
            kind: wire::CredentialKind::X509 as i32,
            role: args.role,
            ttl_seconds: ttl_seconds(args.ttl)?,
            csr_der,
            sans: args.sans,
            ..Default::default()
        },
    )
    .await?;
    credentials::check_x509(&gr, &key)?;
    write_secret(&args.out.join("key.pem"), key.serialize_pem().as_bytes())?;
    write_atomic(&args.out.join("cert.pem"), gr.cert_pem.as_bytes(), 0o644)?;
    write_atomic(&args.out.join("ca.pem"), gr.chain_pem.as_bytes(), 0o644)?;
    Ok(gr)
}

pub async fn get_ssh(args: GetSsh) -> Result<wire::GrantResponse> {
    prepare_out(&args.out)?;
    let (key, public) = credentials::ssh_key()?;
    let kind = if args.host { wire::CredentialKind::SshHost } else { wire::CredentialKind::SshUser };
    let gr = grant(
        &args.socket,
        wire::GrantRequest {
            kind: kind as i32,
            role: args.role,
            ttl_seconds: ttl_seconds(args.ttl)?,
            ssh_public_key: public.clone(),
            principals: args.principals,
            ..Default::default()
        },
    )
    .await?;
    credentials::check_ssh(&gr, &key)?;
    write_secret(&args.out.join("id_ed25519"), &credentials::ssh_key_file(&key)?)?;
    write_atomic(&args.out.join("id_ed25519.pub"), format!("{public}\n").as_bytes(), 0o644)?;
    write_atomic(&args.out.join("id_ed25519-cert.pub"), &credentials::ssh_cert_file(&gr), 0o644)?;
    Ok(gr)
}

pub struct GetToken {
    pub role: String,
    pub policies: Vec<String>,
    pub out: PathBuf,
    pub socket: PathBuf,
    pub ttl: Option<Duration>,
    pub uses: u32,
}

/// A Vault token: writes `token` (0600) and `token.json` (accessor, expiry; 0600).
pub async fn get_token(args: GetToken) -> Result<wire::GrantResponse> {
    prepare_out(&args.out)?;
    let gr = grant(
        &args.socket,
        wire::GrantRequest {
            kind: wire::CredentialKind::VaultToken as i32,
            role: args.role,
            ttl_seconds: ttl_seconds(args.ttl)?,
            vault_policies: args.policies.clone(),
            num_uses: args.uses,
            ..Default::default()
        },
    )
    .await?;
    if gr.vault_token.is_empty() {
        bail!("the reply holds no token");
    }
    write_secret(&args.out.join("token"), format!("{}\n", gr.vault_token).as_bytes())?;
    let meta = serde_json::json!({
        "accessor": gr.token_accessor,
        "policies": args.policies,
        "not_after_unix": gr.not_after_unix,
    });
    write_secret(&args.out.join("token.json"), format!("{meta:#}\n").as_bytes())?;
    Ok(gr)
}

pub struct GetSecret {
    pub role: String,
    pub out: PathBuf,
    pub socket: PathBuf,
    pub ttl: Option<Duration>,
}

/// A dynamic secret: writes `secret.json` (0600) with the data, lease id and expiry.
pub async fn get_secret(args: GetSecret) -> Result<wire::GrantResponse> {
    prepare_out(&args.out)?;
    let gr = grant(
        &args.socket,
        wire::GrantRequest {
            kind: wire::CredentialKind::DynamicSecret as i32,
            role: args.role,
            ttl_seconds: ttl_seconds(args.ttl)?,
            ..Default::default()
        },
    )
    .await?;
    let data: serde_json::Value = serde_json::from_str(&gr.secret_json).context("the secret is not JSON")?;
    let doc = serde_json::json!({ "data": data, "lease_id": gr.lease_id, "not_after_unix": gr.not_after_unix });
    write_secret(&args.out.join("secret.json"), format!("{doc:#}\n").as_bytes())?;
    Ok(gr)
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
