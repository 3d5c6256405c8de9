//! Credential minting behind one trait. The embedded CA implements it today;
//! Vault/OpenBao backends implement the same trait (RFD 0004).

pub mod embedded;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A checked request to mint one credential. Policy has already allowed it,
/// and `ttl` is already capped.
#[derive(Debug, Clone)]
pub enum Order {
    X509 {
        node: String,
        role: String,
        /// The CSR's subject public key, SubjectPublicKeyInfo DER, from a CSR
        /// whose signature was verified.
        csr: CheckedCsr,
        sans: Vec<String>,
        ttl: Duration,
    },
    Ssh {
        node: String,
        role: String,
        public_key: ssh_key::PublicKey,
        principals: Vec<String>,
        ttl: Duration,
        host: bool,
    },
}

/// A CSR whose signature verified; only its public key is used.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    pub der: Vec<u8>,
    pub public_key: rcgen::PublicKey,
    pub sans: Vec<String>,
}

/// What was minted. Fields other than the certificate are for the audit entry.
#[derive(Debug, Clone)]
pub struct Issued {
    pub serial: String,
    /// SHA-256 over the certificate bytes, hex.
    pub fingerprint: String,
    pub not_before: i64,
    pub not_after: i64,
    pub cert_pem: String,
    pub chain_pem: String,
    pub ssh_certificate: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("{0}")]
    BadRequest(String),
    #[error("credential backend unavailable: {0}")]
    Unavailable(String),
    #[error("credential backend failed: {0}")]
    Internal(String),
}

pub type IssueFuture<'a> = Pin<Box<dyn Future<Output = Result<Issued, IssueError>> + Send + 'a>>;

pub trait Issuer: Send + Sync {
    fn issue<'a>(&'a self, order: &'a Order) -> IssueFuture<'a>;
}

/// Parses a PKCS#10 CSR and verifies its self-signature.
pub fn check_csr(der: &[u8]) -> Result<CheckedCsr, String> {
    if der.is_empty() {
        return Err("the request carries no CSR".into());
    }
    let parsed = rcgen::CertificateSigningRequestParams::from_der(&der.to_vec().into())
        .map_err(|e| format!("the CSR is not valid: {e}"))?;
    let sans = parsed
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            rcgen::SanType::DnsName(n) => Some(n.as_str().to_owned()),
            rcgen::SanType::IpAddress(ip) => Some(ip.to_string()),
            _ => None,
        })
        .collect();
    Ok(CheckedCsr { der: der.to_vec(), public_key: parsed.public_key, sans })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_checks() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap();
        let csr = params.serialize_request(&key).unwrap();
        let checked = check_csr(csr.der()).unwrap();
        assert_eq!(checked.sans, vec!["a.example".to_owned()]);
        let mut bad = csr.der().to_vec();
        let n = bad.len();
        bad[n - 5] ^= 0x55; // inside the signature
        assert!(check_csr(&bad).unwrap_err().contains("not valid"));
        assert!(check_csr(b"garbage").is_err());
        assert!(check_csr(b"").is_err());
    }
}
