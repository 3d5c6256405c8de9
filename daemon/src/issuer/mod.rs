//! Credential minting behind one trait, implemented by the embedded CA, by
//! Vault/OpenBao (`crate::vault`), and by [`backends::Backends`], which routes
//! each kind to the issuer configured for it (RFD 0004).

pub mod backends;
pub mod embedded;
pub mod keys;
pub mod svid;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A checked request to mint one credential. Policy has already allowed it,
/// and `ttl` is already capped.
#[derive(Debug, Clone)]
pub struct Order {
    pub node: String,
    pub role: String,
    pub ttl: Duration,
    pub what: What,
}

/// The kind-specific part of an order.
#[derive(Debug, Clone)]
pub enum What {
    X509 {
        /// From a CSR whose signature was verified.
        csr: CheckedCsr,
        sans: Vec<String>,
    },
    Ssh {
        public_key: ssh_key::PublicKey,
        principals: Vec<String>,
        host: bool,
    },
    VaultToken {
        policies: Vec<String>,
        /// 0: unlimited.
        num_uses: u32,
    },
    Secret {
        /// The leased Vault path, e.g. `database/creds/readonly`.
        path: String,
    },
    /// A SPIFFE X509-SVID (RFD 0011); the ID is policy's, filled in before
    /// the order reaches an issuer.
    X509Svid {
        csr: CheckedCsr,
        spiffe_id: String,
    },
    /// A SPIFFE JWT-SVID bound to `audience`.
    JwtSvid {
        spiffe_id: String,
        audience: Vec<String>,
    },
}

/// A CSR whose signature verified; only its public key is used.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    pub der: Vec<u8>,
    pub public_key: rcgen::PublicKey,
    /// DNS and IP SANs the CSR asks for.
    pub sans: Vec<String>,
    /// The subject common name the CSR asks for, if any.
    pub common_name: Option<String>,
}

impl CheckedCsr {
    /// Every name the CSR carries must be among `allowed` (the names policy
    /// checked): a backend that honours CSR names (Vault's `pki/sign` does)
    /// must not be handed a name policy never saw.
    pub fn names_within(&self, allowed: &[String]) -> Result<(), String> {
        for name in self.sans.iter().chain(self.common_name.iter()) {
            if !allowed.contains(name) {
                return Err(format!(
                    "the CSR names {name:?}, which the request does not ask for; put every name in the request's SANs"
                ));
            }
        }
        Ok(())
    }
}

/// What was minted. `serial` and `fingerprint` go into the audit entry; the
/// rest goes only to the requester.
#[derive(Clone, Default)]
pub struct Issued {
    pub serial: String,
    /// SHA-256 over the certificate bytes, or the Vault fingerprint of the
    /// token accessor or lease id (`grantline_proto::audit::event::vault_fingerprint`), hex.
    pub fingerprint: String,
    pub not_before: i64,
    pub not_after: i64,
    pub cert_pem: String,
    pub chain_pem: String,
    pub ssh_certificate: String,
    pub vault_token: String,
    pub token_accessor: String,
    pub secret_json: String,
    pub lease_id: String,
    /// SVIDs: the ID issued, the JWT-SVID, and the trust domain's bundles.
    pub spiffe_id: String,
    pub jwt_svid: String,
    pub trust_domain: String,
    pub x509_bundle_pem: String,
    pub jwt_bundle_json: String,
}

/// Never prints tokens or secret data.
impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("serial", &self.serial)
            .field("fingerprint", &self.fingerprint)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
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

pub type WithdrawFuture<'a> = Pin<Box<dyn Future<Output = Result<(), IssueError>> + Send + 'a>>;

pub trait Issuer: Send + Sync {
    fn issue<'a>(&'a self, order: &'a Order) -> IssueFuture<'a>;

    /// Takes back a credential that will not be delivered (its grant could
    /// not be audited, or the node was revoked meanwhile). A certificate
    /// that never leaves the broker needs nothing; a Vault lease or token
    /// is revoked.
    fn withdraw<'a>(&'a self, _issued: &'a Issued) -> WithdrawFuture<'a> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Parses a PKCS#10 CSR and verifies its self-signature.
pub fn check_csr(der: &[u8]) -> Result<CheckedCsr, String> {
    if der.is_empty() {
        return Err("the request carries no CSR".into());
    }
    // Parsed twice on purpose: x509-parser reads the key's algorithm and
    // size, checked first so that a weak key is named as such (its signature
    // may not even be checkable); rcgen then verifies the proof of possession
    // (its `from_der` checks the signature, once) and gives what signing needs.
    let (_, request) =
        <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<_>>::from_der(
            der,
        )
        .map_err(|e| format!("the CSR is not valid DER: {e}"))?;
    keys::check_spki(&request.certification_request_info.subject_pki)?;
    let parsed = rcgen::CertificateSigningRequestParams::from_der(&der.to_vec().into())
        .map_err(|e| format!("the CSR is not valid: {e}"))?;
    let sans = parsed
        .params
        .subject_alt_names
        .iter()
        .map(|s| match s {
            rcgen::SanType::DnsName(n) => Ok(n.as_str().to_owned()),
            rcgen::SanType::IpAddress(ip) => Ok(ip.to_string()),
            other => Err(format!("the CSR carries a {other:?} SAN; only DNS names and IP addresses are issued")),
        })
        .collect::<Result<_, _>>()?;
    let common_name = match parsed.params.distinguished_name.get(&rcgen::DnType::CommonName) {
        None => None,
        Some(rcgen::DnValue::Utf8String(s)) => Some(s.clone()),
        Some(rcgen::DnValue::PrintableString(s)) => Some(s.as_str().to_owned()),
        Some(rcgen::DnValue::Ia5String(s)) => Some(s.as_str().to_owned()),
        Some(other) => Some(format!("{other:?}")),
    };
    Ok(CheckedCsr { der: der.to_vec(), public_key: parsed.public_key, sans, common_name })
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
        assert_eq!(checked.common_name.as_deref(), Some("rcgen self signed cert"));
        assert!(checked.names_within(&["a.example".into()]).unwrap_err().contains("rcgen self signed cert"));
        assert!(checked.names_within(&["a.example".into(), "rcgen self signed cert".into()]).is_ok());
        let mut bad = csr.der().to_vec();
        let n = bad.len();
        bad[n - 5] ^= 0x55; // inside the signature
        assert!(check_csr(&bad).unwrap_err().contains("not valid"));
        assert!(check_csr(b"garbage").is_err());
        // Keys the broker does not certify: 1024-bit RSA (and DSA, which
        // rcgen cannot even make) are refused; RSA 2048 is accepted.
        let rsa = |bits: usize| {
            let der = std::process::Command::new("openssl")
                .args(["req", "-new", "-newkey", &format!("rsa:{bits}"), "-nodes", "-subj", "/CN=a.example"])
                .args(["-keyout", "/dev/null", "-outform", "DER"])
                .output()
                .unwrap();
            assert!(der.status.success(), "{}", String::from_utf8_lossy(&der.stderr));
            der.stdout
        };
        let weak = check_csr(&rsa(1024)).unwrap_err();
        assert!(weak.contains("1024-bit RSA"), "{weak}");
        assert!(check_csr(&rsa(2048)).is_ok());
        let dsa = std::process::Command::new("sh")
            .args(["-c", "openssl dsaparam -out /dev/stdout 1024 2>/dev/null | openssl req -new -newkey dsa:/dev/stdin -nodes -subj /CN=a -keyout /dev/null -outform DER"])
            .output()
            .unwrap();
        if dsa.status.success() {
            assert!(check_csr(&dsa.stdout).unwrap_err().contains("DSA"));
        }
        assert!(check_csr(b"").is_err());
    }
}
