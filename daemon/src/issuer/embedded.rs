//! The embedded CA issuer: X.509 leaves from the workload CA, SSH certificates
//! from the SSH CA. Signing is CPU work of tens of microseconds; it runs inline
//! on the request task.

use grantline_proto::audit::event::certificate_fingerprint;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use grantline_proto::clock::unix;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};

use super::{CheckedCsr, IssueError, IssueFuture, Issued, Issuer, Order, What};
use crate::pki::{parse_san, random_serial, Pki};

/// Certificates start a little in the past so that nodes with a slightly slow
/// clock accept them at once.
const BACKDATE: Duration = Duration::from_secs(60);

pub struct EmbeddedIssuer {
    pki: Arc<Pki>,
}

impl EmbeddedIssuer {
    pub fn new(pki: Arc<Pki>) -> Self {
        Self { pki }
    }
}

/// Signs a workload leaf for `csr`'s key with `ca`; `chain_pem` is the chain
/// above the leaf, up to the trust anchor. Shared by the embedded CA and the
/// intermediate obtained from Vault.
pub fn sign_leaf(
    ca: &rcgen::Issuer<'_, KeyPair>,
    chain_pem: &str,
    csr: &CheckedCsr,
    sans: &[String],
    ttl: Duration,
) -> Result<Issued, IssueError> {
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    p.subject_alt_names =
        sans.iter().map(|s| parse_san(s)).collect::<Result<_, _>>().map_err(IssueError::BadRequest)?;
    if let Some(first) = sans.first() {
        p.distinguished_name.push(DnType::CommonName, first.as_str());
    }
    p.not_before = (now - BACKDATE).into();
    p.not_after = (now + ttl).into();
    let serial = random_serial();
    p.serial_number = Some(serial.clone());
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    let cert =
        p.signed_by(&csr.public_key, ca).map_err(|e| IssueError::Internal(format!("signing the leaf failed: {e}")))?;
    Ok(Issued {
        serial: hex::encode(serial.to_bytes()),
        fingerprint: certificate_fingerprint(cert.der()),
        not_before: unix(now - BACKDATE),
        not_after: unix(now + ttl),
        cert_pem: cert.pem(),
        chain_pem: chain_pem.to_owned(),
        ..Issued::default()
    })
}

/// What an SSH certificate is, apart from its key and validity.
pub struct SshParams<'a> {
    pub key_id: String,
    pub principals: &'a [String],
    pub host: bool,
}

fn sign_ssh(
    ca: &ssh_key::PrivateKey,
    key: &ssh_key::PublicKey,
    params: &SshParams<'_>,
    ttl: Duration,
) -> Result<Issued, IssueError> {
    let now = SystemTime::now();
    let valid_after = unix(now - BACKDATE);
    let valid_before = unix(now + ttl);
    let bad = |e: ssh_key::Error| IssueError::BadRequest(format!("cannot certify this SSH key: {e}"));
    let mut b = ssh_key::certificate::Builder::new_with_random_nonce(
        &mut rand_core::OsRng,
        key.key_data().clone(),
        u64::try_from(valid_after).unwrap_or(0),
        u64::try_from(valid_before).unwrap_or(0),
    )
    .map_err(bad)?;
    let serial: u64 = rand::random();
    b.serial(serial).map_err(bad)?;
    b.key_id(format!("{}:{serial}", params.key_id)).map_err(bad)?;
    let cert_type =
        if params.host { ssh_key::certificate::CertType::Host } else { ssh_key::certificate::CertType::User };
    b.cert_type(cert_type).map_err(bad)?;
    for p in params.principals {
        b.valid_principal(p.as_str()).map_err(bad)?;
    }
    if !params.host {
        b.extension("permit-pty", "").map_err(bad)?;
    }
    let cert = b.sign(ca).map_err(|e| IssueError::Internal(format!("SSH signing failed: {e}")))?;
    let blob = cert.to_bytes().map_err(|e| IssueError::Internal(e.to_string()))?;
    Ok(Issued {
        serial: serial.to_string(),
        fingerprint: certificate_fingerprint(&blob),
        not_before: valid_after,
        not_after: valid_before,
        ssh_certificate: cert.to_openssh().map_err(|e| IssueError::Internal(e.to_string()))?,
        ..Issued::default()
    })
}

impl Issuer for EmbeddedIssuer {
    fn issue<'a>(&'a self, order: &'a Order) -> IssueFuture<'a> {
        Box::pin(async move {
            match &order.what {
                What::X509 { csr, sans } => {
                    sign_leaf(&self.pki.x509_ca.issuer, &self.pki.x509_chain_pem(), csr, sans, order.ttl)
                }
                What::Ssh { public_key, principals, host } => {
                    let params = SshParams {
                        key_id: format!("grantline:{}:{}", order.node, order.role),
                        principals,
                        host: *host,
                    };
                    sign_ssh(&self.pki.ssh_ca, public_key, &params, order.ttl)
                }
                What::VaultToken { .. } | What::Secret { .. } | What::X509Svid { .. } | What::JwtSvid { .. } => {
                    Err(IssueError::BadRequest("the embedded CA issues only x509 and ssh credentials".into()))
                }
            }
        })
    }
}
