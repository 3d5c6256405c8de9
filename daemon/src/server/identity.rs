//! Node identities: reading the peer's certificate, issuing identity certificates.

use std::time::{Duration, SystemTime};

use grantline_proto::audit::event::certificate_fingerprint;
use grantline_proto::clock::unix;
use grantline_proto::wire;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose, SanType};
use rustls::pki_types::CertificateDer;

use crate::issuer::CheckedCsr;
use crate::pki::{random_serial, Pki};
use crate::registry::Refusal;

/// The authenticated node behind a connection, read from the certificate that
/// rustls has already verified against the node CA.
#[derive(Debug, Clone)]
pub struct PeerNode {
    pub name: String,
    pub serial: String,
    pub not_after: i64,
}

impl PeerNode {
    pub fn from_connection(conn: &quinn::Connection) -> Option<Self> {
        let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
        // rustls checked the validity on a full handshake; a resumed session
        // (RFD 0008) carries the certificate from its ticket unchecked.
        if !cert.validity().is_valid() {
            return None;
        }
        let name = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
        Some(Self { name, serial: hex::encode(cert.raw_serial()), not_after: cert.validity().not_after.timestamp() })
    }
}

/// Node names: what goes into certificates and policy globs, so kept plain.
pub fn check_node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(format!("node name {name:?} is not valid: use 1-64 letters, digits, '-', '.', '_'"))
    }
}

pub struct IssuedIdentity {
    pub chain_der: Vec<Vec<u8>>,
    pub serial: String,
    pub fingerprint: String,
    pub not_after: i64,
}

/// Issues a node identity certificate (client auth only) from the node CA.
pub fn issue_identity(pki: &Pki, name: &str, csr: &CheckedCsr, ttl: Duration) -> Result<IssuedIdentity, String> {
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name.push(DnType::OrganizationName, "Grantline node");
    let uri = rcgen::string::Ia5String::try_from(format!("urn:grantline:node:{name}")).map_err(|e| e.to_string())?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // No backdating: only the broker checks this certificate, with its own
    // clock, and the agent's renewal schedule is a fraction of its lifetime.
    p.not_before = now.into();
    p.not_after = (now + ttl).into();
    let serial = random_serial();
    p.serial_number = Some(serial.clone());
    p.use_authority_key_identifier_extension = true;
    let cert = p
        .signed_by(&csr.public_key, &pki.node_ca.issuer)
        .map_err(|e| format!("signing the node identity failed: {e}"))?;
    Ok(IssuedIdentity {
        fingerprint: certificate_fingerprint(cert.der()),
        chain_der: vec![cert.der().to_vec(), pki.node_ca.cert_der.to_vec(), pki.root.cert_der.to_vec()],
        serial: hex::encode(serial.to_bytes()),
        not_after: unix(now + ttl),
    })
}

/// What a peer is told when its identity may not be used, and with which
/// code: on a request, and when its connection is closed at once.
pub(crate) fn refused(refusal: &Refusal, node: &str, serial: &str) -> wire::Error {
    match refusal {
        Refusal::Revoked => wire::Error::new(wire::ErrorCode::Revoked, format!("node {node} has been revoked")),
        Refusal::NotEnrolled => {
            wire::Error::new(wire::ErrorCode::Unauthenticated, format!("node {node} is not enrolled with this broker"))
        }
        Refusal::Replaced => {
            wire::Error::new(wire::ErrorCode::Unauthenticated, crate::state::replaced_identity(node, serial))
        }
    }
}
