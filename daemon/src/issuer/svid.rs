//! SPIFFE SVIDs (RFD 0011): X509-SVIDs from the SVID CA, JWT-SVIDs signed
//! with the trust domain's JWT key. Both come with the trust domain's
//! bundles, so an agent learns of a new root or key with its next SVID.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use grantline_proto::audit::event::certificate_fingerprint;
use grantline_proto::clock::unix;
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};

use super::{CheckedCsr, IssueError, IssueFuture, Issued, Issuer, Order, What};
use crate::pki::{random_serial, Ca, Pki};
use crate::spiffe::JwtKey;

/// X509-SVIDs start a little in the past, like every leaf the broker signs.
const BACKDATE: Duration = Duration::from_secs(60);

pub struct SvidIssuer {
    pki: Arc<Pki>,
    jwt: JwtKey,
    trust_domain: String,
    /// The `iss` claim of JWT-SVIDs: the OIDC issuer URL, if one is served.
    issuer_url: String,
}

impl SvidIssuer {
    pub fn new(pki: Arc<Pki>, jwt: JwtKey, trust_domain: String, issuer_url: String) -> Self {
        Self { pki, jwt, trust_domain, issuer_url }
    }

    fn bundles(&self, issued: Issued, spiffe_id: &str) -> Issued {
        Issued {
            spiffe_id: spiffe_id.to_owned(),
            trust_domain: self.trust_domain.clone(),
            x509_bundle_pem: self.pki.root.cert_pem.clone(),
            jwt_bundle_json: self.jwt.jwks("jwt-svid"),
            ..issued
        }
    }

    fn jwt_svid(&self, spiffe_id: &str, audience: &[String], ttl: Duration) -> Result<Issued, IssueError> {
        let now = unix(SystemTime::now());
        let jti = hex::encode(random_serial().to_bytes());
        let token = self
            .jwt
            .sign(spiffe_id, audience, now, ttl, &jti, &self.issuer_url)
            .map_err(|e| IssueError::Internal(format!("{e:#}")))?;
        Ok(Issued {
            // The token is a bearer credential: the log names it by its id
            // and a hash, never by itself.
            fingerprint: grantline_proto::audit::event::token_fingerprint(&token),
            serial: jti,
            not_before: now,
            not_after: now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
            jwt_svid: token,
            ..Issued::default()
        })
    }
}

/// Signs an X509-SVID for `csr`'s key: exactly one URI SAN (the SPIFFE ID),
/// cA false, a critical key usage of digitalSignature (and keyEncipherment
/// for RSA keys), serverAuth and clientAuth; the chain above it is the SVID
/// CA, whose root is the trust bundle (X509-SVID standard §§2-4).
pub fn sign_x509_svid(ca: &Ca, csr: &CheckedCsr, spiffe_id: &str, ttl: Duration) -> Result<Issued, IssueError> {
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    let uri = rcgen::string::Ia5String::try_from(spiffe_id.to_owned())
        .map_err(|e| IssueError::BadRequest(format!("{spiffe_id:?} cannot be a URI SAN: {e}")))?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::OrganizationName, "SPIFFE");
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if csr.public_key.algorithm() == &rcgen::PKCS_RSA_SHA256 {
        p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = (now - BACKDATE).into();
    p.not_after = (now + ttl).into();
    let serial = random_serial();
    p.serial_number = Some(serial.clone());
    p.use_authority_key_identifier_extension = true;
    let cert = p
        .signed_by(&csr.public_key, &ca.issuer)
        .map_err(|e| IssueError::Internal(format!("signing the X509-SVID failed: {e}")))?;
    Ok(Issued {
        serial: hex::encode(serial.to_bytes()),
        fingerprint: certificate_fingerprint(cert.der()),
        not_before: unix(now - BACKDATE),
        not_after: unix(now + ttl),
        cert_pem: cert.pem(),
        chain_pem: ca.cert_pem.clone(),
        ..Issued::default()
    })
}

impl Issuer for SvidIssuer {
    fn issue<'a>(&'a self, order: &'a Order) -> IssueFuture<'a> {
        Box::pin(async move {
            match &order.what {
                What::X509Svid { csr, spiffe_id } => {
                    let ca = self.pki.svid_ca.as_ref().ok_or_else(|| {
                        IssueError::BadRequest(
                            "this broker's state directory has no svid-ca (it joined its fleet before SVIDs existed); \
                             have the fleet root sign one: see RFD 0011"
                                .into(),
                        )
                    })?;
                    Ok(self.bundles(sign_x509_svid(ca, csr, spiffe_id, order.ttl)?, spiffe_id))
                }
                What::JwtSvid { spiffe_id, audience } => {
                    Ok(self.bundles(self.jwt_svid(spiffe_id, audience, order.ttl)?, spiffe_id))
                }
                _ => Err(IssueError::BadRequest("the SPIFFE issuer issues only SVIDs".into())),
            }
        })
    }
}
