//! The embedded CA hierarchy, created on first start and loaded after:
//!
//! ```text
//! ca.pem / ca.key            root, the trust anchor agents pin
//! ├── node-ca.pem / .key     signs node identity certificates (mTLS clients)
//! ├── x509-ca.pem / .key     signs workload X.509 leaves
//! ├── svid-ca.pem / .key     signs SPIFFE X509-SVIDs (RFD 0011): keyCertSign and
//! │                          cRLSign only, as the X509-SVID standard asks
//! └── server certificate     the broker's QUIC certificate, re-issued at each start
//! ssh-ca / ssh-ca.pub        signs SSH user and host certificates
//! ```
//!
//! Node identities and workload leaves come from different intermediates so
//! that a workload certificate can never authenticate as a node.
//!
//! A broker of a fleet (RFD 0010) holds the fleet root's certificate only:
//! `grantlined fleet join` has the root sign its intermediates, one more
//! among them for its server certificates, and copies the fleet's SSH CA:
//!
//! ```text
//! ca.pem                     the fleet root (its key stays with the admin)
//! ├── server-ca.pem / .key   signs this broker's QUIC certificate
//! ├── node-ca.pem / .key     signs the node identities this broker issues
//! ├── x509-ca.pem / .key     signs workload X.509 leaves
//! └── svid-ca.pem / .key     signs X509-SVIDs (absent in a directory joined
//!                            before SVIDs existed: such a broker issues none)
//! ssh-ca / ssh-ca.pub        the fleet's SSH CA (SSH has no intermediates)
//! ```

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

/// A CA certificate without its key (the fleet root, at a fleet's broker).
pub struct CaCert {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
}

pub struct Pki {
    pub root: CaCert,
    pub node_ca: Ca,
    pub x509_ca: Ca,
    /// The X509-SVID signing CA, under the root (the SPIFFE trust bundle).
    pub svid_ca: Option<Ca>,
    pub ssh_ca: ssh_key::PrivateKey,
    pub server_chain: Vec<CertificateDer<'static>>,
    pub server_key: PrivateKeyDer<'static>,
}

const CA_YEARS: i64 = 10;

impl Pki {
    /// Loads the CA files under `dir`, creating any that are missing, and issues
    /// a fresh server certificate for `server_names`.
    pub fn load_or_create(dir: &Path, server_names: &[String]) -> Result<Self> {
        if dir.join("server-ca.pem").exists() {
            return Self::load_joined(dir, server_names);
        }
        let root = load_or_create_ca(dir, "ca", "Grantline root CA", None)?;
        let node_ca = load_or_create_ca(dir, "node-ca", "Grantline node identity CA", Some(&root))?;
        let x509_ca = load_or_create_ca(dir, "x509-ca", "Grantline workload X.509 CA", Some(&root))?;
        let svid_ca = Some(load_or_create_svid_ca(dir, &root)?);
        let ssh_ca = load_or_create_ssh_ca(dir)?;
        let (server_chain, server_key) = issue_server_cert(&root, None, server_names)?;
        let root = CaCert { cert_pem: root.cert_pem, cert_der: root.cert_der };
        Ok(Self { root, node_ca, x509_ca, svid_ca, ssh_ca, server_chain, server_key })
    }

    /// A fleet broker's state directory, made by [`join_fleet`]: nothing is
    /// created here, a missing file is an error naming the command.
    fn load_joined(dir: &Path, server_names: &[String]) -> Result<Self> {
        let must = |stem: &str| {
            load_ca(dir, stem)?.with_context(|| {
                format!("{}/{stem}.pem is missing; run 'grantlined fleet join' for this state directory", dir.display())
            })
        };
        let root = read_cert(&dir.join("ca.pem"))?;
        let server_ca = must("server-ca")?;
        let (node_ca, x509_ca) = (must("node-ca")?, must("x509-ca")?);
        anyhow::ensure!(
            dir.join("ssh-ca").exists(),
            "{}/ssh-ca is missing; run 'grantlined fleet join'",
            dir.display()
        );
        let ssh_ca = load_or_create_ssh_ca(dir)?;
        let svid_ca = load_ca(dir, "svid-ca")?;
        let (server_chain, server_key) = issue_server_cert(&server_ca, Some(&root), server_names)?;
        Ok(Self { root, node_ca, x509_ca, svid_ca, ssh_ca, server_chain, server_key })
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

fn read_cert(path: &Path) -> Result<CaCert> {
    let cert_pem = grantline_proto::files::read_bounded(path, grantline_proto::files::MAX_SECRET_FILE)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let cert_der = first_cert_der(&cert_pem).with_context(|| format!("{} holds no certificate", path.display()))?;
    Ok(CaCert { cert_pem, cert_der })
}

/// The CA `stem` (`<stem>.pem` and `<stem>.key`) under `dir`, if either exists.
pub fn load_ca(dir: &Path, stem: &str) -> Result<Option<Ca>> {
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    if !(cert_path.exists() || key_path.exists()) {
        return Ok(None);
    }
    let key_pem = read_secret(&key_path)?;
    let key =
        KeyPair::from_pem(&key_pem).with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
    let CaCert { cert_pem, cert_der } = read_cert(&cert_path)?;
    let issuer = Issuer::from_ca_cert_der(&cert_der, key)
        .with_context(|| format!("{} is not a usable CA certificate", cert_path.display()))?;
    Ok(Some(Ca { cert_pem, cert_der, issuer }))
}

fn load_or_create_ca(dir: &Path, stem: &str, cn: &str, parent: Option<&Ca>) -> Result<Ca> {
    load_or_create_ca_with(dir, stem, ca_params(cn, parent.map(|_| 0)), parent)
}

/// The X509-SVID signing CA: a signing certificate per the X509-SVID
/// standard §4 (cA true, keyCertSign and cRLSign, no digitalSignature).
fn load_or_create_svid_ca(dir: &Path, root: &Ca) -> Result<Ca> {
    let mut params = ca_params("Grantline SPIFFE X509-SVID CA", Some(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    load_or_create_ca_with(dir, "svid-ca", params, Some(root))
}

fn load_or_create_ca_with(dir: &Path, stem: &str, params: CertificateParams, parent: Option<&Ca>) -> Result<Ca> {
    if let Some(ca) = load_ca(dir, stem)? {
        return Ok(ca);
    }
    let (cert_path, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
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

/// The broker's QUIC certificate from `issuer` (the root, or a fleet
/// broker's server CA under `root`), with the chain up to the root.
fn issue_server_cert(
    issuer: &Ca,
    root: Option<&CaCert>,
    names: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
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
    let cert = p.signed_by(&key, &issuer.issuer)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut chain = vec![cert.der().clone(), issuer.cert_der.clone()];
    chain.extend(root.map(|r| r.cert_der.clone()));
    Ok((chain, key_der))
}

/// Creates a fleet's root (`ca.pem`, `ca.key`) and SSH CA in `dir`
/// (`grantlined fleet init`); refuses a directory that holds a root.
pub fn init_fleet(dir: &Path) -> Result<()> {
    anyhow::ensure!(
        !dir.join("ca.pem").exists() && !dir.join("ca.key").exists(),
        "{} already holds a root CA; a fleet is initialized once",
        dir.display()
    );
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    load_or_create_ca(dir, "ca", "Grantline fleet root CA", None)?;
    load_or_create_ssh_ca(dir)?;
    // One JWT-SVID key for the fleet, so one JWKS verifies what any broker signs.
    crate::spiffe::JwtKey::load_or_create(dir)?;
    Ok(())
}

/// Prepares a broker's state directory `state_dir` to join the fleet whose
/// root is in `root_dir` (`grantlined fleet join`): the root signs its own
/// intermediates; the root's key is not copied. Refuses a state directory
/// that already has CAs of its own (a broker joins before its first start).
pub fn join_fleet(root_dir: &Path, state_dir: &Path) -> Result<()> {
    let root = load_ca(root_dir, "ca")?.with_context(|| {
        format!("{} holds no fleet root; create one with 'grantlined fleet init --dir DIR'", root_dir.display())
    })?;
    for stem in ["ca.key", "node-ca.pem", "server-ca.pem"] {
        anyhow::ensure!(
            !state_dir.join(stem).exists(),
            "{} already has CAs ({stem}); a broker joins a fleet before its first start, with an empty state directory",
            state_dir.display()
        );
    }
    std::fs::create_dir_all(state_dir).with_context(|| format!("cannot create {}", state_dir.display()))?;
    write_atomic(&state_dir.join("ca.pem"), root.cert_pem.as_bytes(), 0o644)?;
    load_or_create_ca(state_dir, "server-ca", grantline_proto::SERVER_CA_NAME, Some(&root))?;
    load_or_create_ca(state_dir, "node-ca", "Grantline node identity CA", Some(&root))?;
    load_or_create_ca(state_dir, "x509-ca", "Grantline workload X.509 CA", Some(&root))?;
    load_or_create_svid_ca(state_dir, &root)?;
    write_secret(&state_dir.join("ssh-ca"), read_secret(&root_dir.join("ssh-ca"))?.as_bytes())?;
    let public = std::fs::read(root_dir.join("ssh-ca.pub"))?;
    write_atomic(&state_dir.join("ssh-ca.pub"), &public, 0o644)?;
    let jwt = root_dir.join(crate::spiffe::JwtKey::FILE);
    if jwt.exists() {
        write_secret(&state_dir.join(crate::spiffe::JwtKey::FILE), read_secret(&jwt)?.as_bytes())?;
    }
    Ok(())
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
    fn fleet_brokers_share_the_root_and_hold_their_own_intermediates() {
        let (root, a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init_fleet(root.path()).unwrap();
        assert!(init_fleet(root.path()).is_err(), "a fleet is initialized once");
        join_fleet(root.path(), a.path()).unwrap();
        join_fleet(root.path(), b.path()).unwrap();
        assert!(join_fleet(root.path(), a.path()).is_err(), "a state directory joins once");
        assert!(!a.path().join("ca.key").exists(), "the root's key stays with the admin");
        let names = vec!["localhost".to_owned()];
        let (pa, pb) = (Pki::load_or_create(a.path(), &names).unwrap(), Pki::load_or_create(b.path(), &names).unwrap());
        assert_eq!(pa.root.cert_der, pb.root.cert_der);
        assert_ne!(pa.node_ca.cert_der, pb.node_ca.cert_der);
        assert_eq!(pa.ssh_ca.public_key(), pb.ssh_ca.public_key());
        assert_eq!(pa.server_chain.len(), 3, "leaf, the broker's server CA, the fleet root");
        assert_eq!(pa.server_chain[2], pa.root.cert_der);
        let empty = tempfile::tempdir().unwrap();
        let err = join_fleet(empty.path(), a.path()).err().unwrap().to_string();
        assert!(err.contains("fleet init"), "{err}");
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
