//! Intermediate mode: the broker generates a key, has Vault PKI sign it as an
//! intermediate CA (like SPIRE's Vault upstream authority), signs workload
//! leaves locally with it, and rotates it before it expires. Every rotation is
//! an audit entry, written before the new CA signs anything.

use grantline_proto::audit::event::certificate_fingerprint;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grantline_proto::audit::Event;
use grantline_proto::clock::now_unix;
use rcgen::{CertificateParams, DnType, KeyPair};
use vaultrs::api::pki::requests::SignIntermediateRequest;

use super::Vault;
use crate::audit::AuditLog;
use crate::issuer::embedded::sign_leaf;
use crate::issuer::{IssueError, IssueFuture, Issuer, Order, What};

struct LocalCa {
    issuer: rcgen::Issuer<'static, KeyPair>,
    /// The intermediate, then Vault's chain above it.
    chain_pem: String,
    /// When the broker obtained it (Vault backdates `not_before`, by 30 s by
    /// default, so rotation is timed from here).
    obtained: i64,
    not_after: i64,
}

pub struct Intermediate {
    vault: Arc<Vault>,
    audit: AuditLog,
    current: RwLock<Option<Arc<LocalCa>>>,
}

/// Rotate when two thirds of the intermediate's useful life (from when it was
/// obtained to its expiry) have passed, leaving a third to obtain the next one
/// while Vault is slow or down. (A leaf never outlives its issuer: `issue`
/// caps it at the issuer's remaining life.)
fn rotate_at(obtained: i64, not_after: i64) -> i64 {
    obtained + (not_after - obtained).max(0) * 2 / 3
}

impl Intermediate {
    pub fn new(vault: Arc<Vault>, audit: AuditLog) -> Arc<Self> {
        Arc::new(Self { vault, audit, current: RwLock::new(None) })
    }

    fn current(&self) -> Option<Arc<LocalCa>> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Obtains a new intermediate from Vault and switches to it.
    pub async fn rotate(&self) -> Result<(), IssueError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| IssueError::Internal(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "Grantline intermediate CA");
        let csr = params.serialize_request(&key).map_err(|e| IssueError::Internal(e.to_string()))?;
        let csr_pem = grantline_proto::pem::encode("CERTIFICATE REQUEST", csr.der());
        let mount = &self.vault.config.pki_mount;
        let ttl = format!("{}s", self.vault.config.intermediate_ttl.as_secs());
        let r = self
            .vault
            .call("signing the intermediate", |c| {
                let mut opts = SignIntermediateRequest::builder();
                opts.ttl(ttl.clone()).max_path_length(0).use_csr_values(true);
                let csr_pem = csr_pem.clone();
                async move {
                    vaultrs::pki::cert::ca::sign_intermediate(
                        &*c,
                        mount,
                        &csr_pem,
                        "Grantline intermediate CA",
                        Some(&mut opts),
                    )
                    .await
                }
            })
            .await?;
        let der = rustls_pemfile::certs(&mut r.certificate.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| IssueError::Internal("Vault returned no intermediate certificate".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| IssueError::Internal(format!("Vault returned an unreadable intermediate: {e}")))?;
        let not_after = cert.validity().not_after.timestamp();
        let serial = hex::encode(cert.raw_serial());
        let issuer = rcgen::Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| IssueError::Internal(format!("the intermediate from Vault is not usable: {e}")))?;
        let mut chain_pem = format!("{}\n", r.certificate.trim_end());
        match &r.ca_chain {
            Some(chain) if !chain.is_empty() => {
                for c in chain.iter().filter(|c| c.trim() != r.certificate.trim()) {
                    chain_pem.push_str(&format!("{}\n", c.trim_end()));
                }
            }
            _ => chain_pem.push_str(&format!("{}\n", r.issuing_ca.trim_end())),
        }
        let event = Event::CaRotation {
            ca: "x509-intermediate".into(),
            issuer: format!("vault:{mount}"),
            serial: serial.clone(),
            fingerprint: certificate_fingerprint(&der),
            not_after,
        };
        self.audit.append(event).await.map_err(|e| IssueError::Unavailable(e.to_string()))?;
        let ca = LocalCa { issuer, chain_pem, obtained: now_unix(), not_after };
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(ca));
        tracing::info!(%serial, not_after, "new intermediate CA from Vault");
        Ok(())
    }

    /// Keeps a valid intermediate: obtains the first, rotates at two thirds of
    /// each one's life, and retries with backoff while Vault is unreachable.
    pub async fn maintain(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            let now = now_unix();
            let due = self.current().map_or(now, |ca| rotate_at(ca.obtained, ca.not_after));
            if due > now {
                tokio::time::sleep(Duration::from_secs(u64::try_from(due - now).unwrap_or(0))).await;
                continue;
            }
            match self.rotate().await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "cannot obtain an intermediate CA from Vault; retrying");
                    tokio::time::sleep(Duration::from_millis(500 * 2u64.pow(failures.min(6)))).await;
                }
            }
        }
    }
}

impl Issuer for Intermediate {
    fn issue<'a>(&'a self, order: &'a Order) -> IssueFuture<'a> {
        Box::pin(async move {
            let What::X509 { csr, sans } = &order.what else {
                return Err(IssueError::BadRequest("the intermediate CA issues only x509 credentials".into()));
            };
            let Some(ca) = self.current() else {
                return Err(IssueError::Unavailable("no intermediate CA from Vault yet (is Vault reachable?)".into()));
            };
            let now = now_unix();
            if ca.not_after <= now {
                return Err(IssueError::Unavailable(
                    "the intermediate CA expired and Vault has not signed a new one".into(),
                ));
            }
            // A leaf never outlives its issuer.
            // (Measured from the exact time, so that whole-second rounding of
            // "now" cannot push the leaf past the issuer's expiry.)
            let expiry = UNIX_EPOCH + Duration::from_secs(u64::try_from(ca.not_after).unwrap_or(0));
            let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
            sign_leaf(&ca.issuer, &ca.chain_pem, csr, sans, order.ttl.min(left))
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rotation_is_due_at_two_thirds() {
        assert_eq!(super::rotate_at(0, 3000), 2000);
        assert_eq!(super::rotate_at(100, 100), 100);
        // Obtained after its expiry (a clock step): due at once, never earlier.
        assert_eq!(super::rotate_at(200, 100), 200);
    }
}
