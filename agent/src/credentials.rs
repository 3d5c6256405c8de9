//! What a grant returns, checked against the key the agent made for it and
//! turned into the bytes its files hold: shared by `get` and the sinks.

use anyhow::{bail, Context, Result};
use grantline_proto::wire;

/// A fresh P-256 key and a CSR naming only `sans` (the first also as CN).
pub fn x509_key_and_csr(sans: &[String]) -> Result<(rcgen::KeyPair, Vec<u8>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(sans.to_vec()).context("invalid SAN")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(first) = sans.first() {
        params.distinguished_name.push(rcgen::DnType::CommonName, first.as_str());
    }
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// Refuses a certificate that does not certify `key`.
pub fn check_x509(gr: &wire::GrantResponse, key: &rcgen::KeyPair) -> Result<()> {
    let der = rustls_pemfile::certs(&mut gr.cert_pem.as_bytes()).next().context("the reply holds no certificate")??;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).context("the issued certificate does not parse")?;
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice() {
        bail!("the issued certificate is for another key; refusing it");
    }
    Ok(())
}

/// A fresh Ed25519 key for an SSH certificate, with its public half in
/// OpenSSH form (what the request carries).
pub fn ssh_key() -> Result<(ssh_key::PrivateKey, String)> {
    let key = ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519)?;
    let public = key.public_key().to_openssh()?;
    Ok((key, public))
}

/// Refuses an SSH certificate that does not parse or does not certify `key`.
pub fn check_ssh(gr: &wire::GrantResponse, key: &ssh_key::PrivateKey) -> Result<()> {
    let cert =
        ssh_key::Certificate::from_openssh(&gr.ssh_certificate).context("the issued SSH certificate does not parse")?;
    if cert.public_key() != key.public_key().key_data() {
        bail!("the issued SSH certificate is for another key; refusing it");
    }
    Ok(())
}

/// The private key as its file holds it (OpenSSH, LF line ends).
pub fn ssh_key_file(key: &ssh_key::PrivateKey) -> Result<Vec<u8>> {
    Ok(key.to_openssh(ssh_key::LineEnding::LF)?.as_bytes().to_vec())
}

/// The certificate as its `-cert.pub` file holds it.
pub fn ssh_cert_file(gr: &wire::GrantResponse) -> Vec<u8> {
    format!("{}\n", gr.ssh_certificate).into_bytes()
}
