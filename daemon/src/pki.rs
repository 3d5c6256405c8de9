//! The embedded CA hierarchy, created on first start and loaded after:
//!
//! ```text
//! ca.pem / ca.key            root, the trust anchor agents pin
//! ├── node-ca.pem / .key     signs node identity certificates (mTLS clients)
//! ├── x509-ca.pem / .key     signs workload X.509 leaves
//! └── server certificate     the broker's QUIC certificate, re-issued at each start
//! ssh-ca / ssh-ca.pub        signs SSH user and host certificates
//! ```
//!
//! Node identities and workload leaves come from different intermediates so
//! that a workload certificate can never authenticate as a node.

use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use grantline_proto::files::{read_secret, write_atomic, write_secret};

/// One CA: its certificate and the issuer that signs with its key.
pub struct Ca {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub issuer: Issuer<'static, KeyPair>,
}

pub struct Pki {
    pub root: Ca,
    pub node_ca: Ca,
    pub x509_ca: Ca,
    pub ssh_ca: ssh_key::PrivateKey,
    pub server_chain: Vec<CertificateDer<'static>>,
    pub server_key: PrivateKeyDer<'static>,
}

const CA_YEARS: i64 = 10;

impl Pki {
    /// Loads the CA files under `dir`, creating any that are missing, and issues
    /// a fresh server certificate for `server_names`.
    pub fn load_or_create(dir: &Path, server_names: &[String]) -> Result<Self> {
        let root = load_or_create_ca(dir, "ca", "Grantline root CA", None)?;
        let node_ca = load_or_create_ca(dir, "node-ca", "Grantline node identity CA", Some(&root))?;
        let x509_ca = load_or_create_ca(dir, "x509-ca", "Grantline workload X.509 CA", Some(&root))?;
        let ssh_ca = load_or_create_ssh_ca(dir)?;
        let (server_chain, server_key) = issue_server_cert(&root, server_names)?;
        Ok(Self { root, node_ca, x509_ca, ssh_ca, server_chain, server_key })
    }

    /// PEM chain above a workload leaf: the X.509 CA, then the root.
    pub fn x509_chain_pem(&self) -> String {
        format!("{}{}", self.x509_ca.cert_pem, self.root.cert_pem)
    }
}

fn ca_params(cn: &str, path_len: Option<u8>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name.push(DnType::OrganizationName, "Grantline");
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + Duration::days(365 * CA_YEARS);
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    p
}

fn load_or_create_ca(dir: &Path, stem: &str, cn: &str, parent: Option<&Ca>) -> Result<Ca> {
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    if cert_path.exists() || key_path.exists() {
        let key_pem = read_secret(&key_path)?;
        let key =
            KeyPair::from_pem(&key_pem).with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
        let cert_pem = grantline_proto::files::read_bounded(&cert_path, grantline_proto::files::MAX_SECRET_FILE)
            .with_context(|| format!("cannot read {}", cert_path.display()))?;
        let cert_der =
            first_cert_der(&cert_pem).with_context(|| format!("{} holds no certificate", cert_path.display()))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .with_context(|| format!("{} is not a usable CA certificate", cert_path.display()))?;
        return Ok(Ca { cert_pem, cert_der, issuer });
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(cn, parent.map(|_| 0));
    let cert = match parent {
        Some(p) => params.signed_by(&key, &p.issuer)?,
        None => params.self_signed(&key)?,
    };
    write_secret(&key_path, key.serialize_pem().as_bytes())?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    let cert_der = cert.der().clone();
    Ok(Ca { cert_pem: cert.pem(), cert_der, issuer: Issuer::new(params, key) })
}

fn load_or_create_ssh_ca(dir: &Path) -> Result<ssh_key::PrivateKey> {
    let path = dir.join("ssh-ca");
    if path.exists() {
        let text = read_secret(&path)?;
        return ssh_key::PrivateKey::from_openssh(text)
            .with_context(|| format!("{} is not an OpenSSH private key", path.display()));
    }
    let mut key = ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519)?;
    key.set_comment("grantline-ssh-ca");
    write_secret(&path, key.to_openssh(ssh_key::LineEnding::LF)?.as_bytes())?;
    write_atomic(&dir.join("ssh-ca.pub"), format!("{}\n", key.public_key().to_openssh()?).as_bytes(), 0o644)?;
    Ok(key)
}

fn issue_server_cert(root: &Ca, names: &[String]) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::new(names.to_vec()).context("invalid server name")?;
    p.distinguished_name.push(DnType::CommonName, "grantlined");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + Duration::days(30);
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, &root.issuer)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((vec![cert.der().clone(), root.cert_der.clone()], key_der))
}

/// A positive 128-bit serial number.
pub fn random_serial() -> rcgen::SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f;
    b[0] |= 0x01;
    rcgen::SerialNumber::from_slice(&b)
}

/// The first certificate in a PEM bundle.
pub fn first_cert_der(pem: &str) -> Option<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes()).next()?.ok()
}

/// Parses SAN strings: IP addresses as IP SANs, the rest as DNS names.
pub fn parse_san(name: &str) -> Result<SanType, String> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid {
        return Err(format!("{name:?} is not a DNS name or IP address (wildcards are not issued)"));
    }
    rcgen::string::Ia5String::try_from(name).map(SanType::DnsName).map_err(|e| format!("{name:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned()];
        let a = Pki::load_or_create(dir.path(), &names).unwrap();
        let b = Pki::load_or_create(dir.path(), &names).unwrap();
        assert_eq!(a.root.cert_pem, b.root.cert_pem);
        assert_eq!(a.node_ca.cert_der, b.node_ca.cert_der);
        assert_eq!(a.ssh_ca.public_key(), b.ssh_ca.public_key());
        assert_ne!(a.server_chain[0], b.server_chain[0]);
    }

    #[test]
    fn san_parsing() {
        assert!(matches!(parse_san("10.0.0.1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(parse_san("a.example.com"), Ok(SanType::DnsName(_))));
        for bad in ["", "*.example.com", "a..b", "-a.b", "a b", "é.com"] {
            assert!(parse_san(bad).is_err(), "{bad:?}");
        }
    }
}
