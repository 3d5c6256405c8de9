//! `grantline-agent enroll`: redeem a join token for a node identity.

use grantline_proto::audit::event::certificate_fingerprint;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use grantline_proto::audit::{receipt, VerifierKey};
use grantline_proto::wire::{self, request::Body as Req, response::Body as Resp};

use crate::broker::call;
use crate::state::{AgentConfig, AgentState, Identity};
use crate::tls;

pub struct EnrollArgs {
    pub broker: String,
    pub token: String,
    pub ca_file: PathBuf,
    pub state_dir: PathBuf,
    /// The node name to ask for; the token may pin another.
    pub name: String,
}

/// A broker's refusal, kept apart so the CLI can pick the exit code.
#[derive(Debug, thiserror::Error)]
#[error("the broker refused: {0}")]
pub struct Refused(pub wire::Error);

/// Generates a key and a CSR for `name`. The key never leaves this host.
pub fn key_and_csr(name: &str) -> Result<(rcgen::KeyPair, Vec<u8>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// Checks that `chain[0]` certifies `key` and that `receipt` records it.
pub fn check_identity(
    key: &rcgen::KeyPair,
    chain: &[Vec<u8>],
    r: Option<&wire::Receipt>,
    trust: &receipt::Trust,
) -> Result<Identity> {
    let leaf = chain.first().context("the broker sent no certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).context("the broker's certificate does not parse")?;
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice() {
        bail!("the broker certified another key than ours");
    }
    trust.check_grant(r, &certificate_fingerprint(leaf))?;
    Identity::from_parts(key.serialize_pem(), chain)
}

pub async fn enroll(args: EnrollArgs) -> Result<AgentConfig> {
    let ca_pem = grantline_proto::files::read_bounded(&args.ca_file, grantline_proto::files::MAX_SECRET_FILE)
        .with_context(|| format!("cannot read the CA file {}", args.ca_file.display()))?;
    let targets = tls::targets(&args.broker)?;
    let server_name = targets[0].1.clone();
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("cannot create {}", args.state_dir.display()))?;
    let (key, csr_der) = key_and_csr(&args.name)?;
    let endpoint = tls::endpoint_for(targets[0].0)?;
    let client = tls::client_config(&ca_pem, None)?;
    // The first broker of a fleet that answers enrolls the node.
    let mut conn = None;
    let mut failures = Vec::new();
    for (addr, name) in &targets {
        let attempt = match endpoint.connect_with(client.clone(), *addr, name) {
            Ok(connecting) => connecting.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match attempt {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    let conn =
        conn.with_context(|| format!("cannot connect to the broker at {} ({})", args.broker, failures.join("; ")))?;
    let req = wire::Request {
        body: Some(Req::Enroll(wire::EnrollRequest {
            token: args.token.trim().to_owned(),
            csr_der,
            node_name: args.name.clone(),
        })),
    };
    let resp = call(&conn, &req).await?;
    conn.close(0u32.into(), b"enrolled");
    let enrolled = match resp.body {
        Some(Resp::Enroll(e)) => e,
        Some(Resp::Error(e)) => return Err(Refused(e).into()),
        _ => bail!("the broker answered enrollment with an unexpected message"),
    };
    let vkey = VerifierKey::parse(&enrolled.audit_vkey).context("the broker's audit key is malformed")?;
    let id = enrolled.identity.context("the broker sent no identity")?;
    let fleet = match enrolled.fleet_vkey.as_str() {
        "" => None,
        k => Some(VerifierKey::parse(k).context("the broker's fleet key is malformed")?),
    };
    let identity = check_identity(
        &key,
        &id.chain_der,
        enrolled.receipt.as_ref(),
        &receipt::Trust { pinned: vkey.clone(), fleet: None },
    )?;
    let config = AgentConfig { broker: args.broker.clone(), server_name, node_name: id.node_name };
    AgentState::save_enrollment(&args.state_dir, &config, &ca_pem, &vkey, fleet.as_ref(), &identity)?;
    endpoint.wait_idle().await;
    Ok(config)
}
