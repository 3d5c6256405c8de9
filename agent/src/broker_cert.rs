//! Which certificates the agent takes as the broker's: one that chains to
//! the pinned root (WebPKI, as rustls checks it) *and* was issued by the
//! root itself or by a fleet broker's server CA. The broker's workload X.509
//! CA chains to the same root and its leaves may carry serverAuth with any
//! name the policy allows: without this check a workload holding such a
//! leaf could pass for the broker to an enrolling agent (and hand it a
//! forged audit key).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

#[derive(Debug)]
pub struct BrokerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    /// The raw subject names of the pinned roots: only the self-signed
    /// certificates of the CA file (a bundle that also holds the workload
    /// CA must not make that CA a broker's issuer).
    roots: Vec<Vec<u8>>,
}

impl BrokerVerifier {
    pub fn new(
        roots: rustls::RootCertStore,
        pinned: &[CertificateDer<'_>],
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> anyhow::Result<Self> {
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
        let roots = pinned
            .iter()
            .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
            .filter(|(_, c)| c.subject().as_raw() == c.issuer().as_raw())
            .map(|(_, c)| c.subject().as_raw().to_vec())
            .collect();
        Ok(Self { inner, roots })
    }

    /// Whether `leaf` was issued by a pinned root or a server CA.
    fn issued_by_a_broker_ca(&self, leaf: &CertificateDer<'_>) -> bool {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else { return false };
        let issuer = cert.issuer();
        self.roots.iter().any(|r| r.as_slice() == issuer.as_raw())
            || issuer.iter_common_name().next().and_then(|cn| cn.as_str().ok()) == Some(grantline_proto::SERVER_CA_NAME)
    }
}

impl ServerCertVerifier for BrokerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let verified = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        if !self.issued_by_a_broker_ca(end_entity) {
            return Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

    fn ca(cn: &str, parent: Option<&Issuer<'static, KeyPair>>) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = match parent {
            Some(i) => p.clone().signed_by(&key, i).unwrap(),
            None => p.clone().self_signed(&key).unwrap(),
        };
        (cert.der().clone(), Issuer::new(p, key))
    }

    fn leaf(by: &Issuer<'static, KeyPair>) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["broker.example".to_owned()]).unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.signed_by(&key, by).unwrap().der().clone()
    }

    #[test]
    fn a_workload_leaf_under_the_same_root_does_not_pass_for_the_broker() {
        let (root_der, root) = ca("Grantline root CA", None);
        let (x509_der, x509) = ca("Grantline workload X.509 CA", Some(&root));
        let (server_der, server) = ca(grantline_proto::SERVER_CA_NAME, Some(&root));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root_der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let v = BrokerVerifier::new(roots, std::slice::from_ref(&root_der), provider).unwrap();
        let name = ServerName::try_from("broker.example").unwrap();
        let check = |leaf: &CertificateDer<'static>, chain: &[CertificateDer<'static>]| {
            v.verify_server_cert(leaf, chain, &name, &[], UnixTime::now())
        };
        assert!(check(&leaf(&root), &[]).is_ok(), "a lone broker's certificate, issued by the root");
        assert!(check(&leaf(&server), std::slice::from_ref(&server_der)).is_ok(), "a fleet broker's, by its server CA");
        let forged = check(&leaf(&x509), std::slice::from_ref(&x509_der));
        assert!(
            matches!(forged, Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))),
            "a workload leaf passed for the broker: {forged:?}"
        );
        // Review finding: a CA file holding the workload chain made the
        // workload CA an issuer of brokers.
        let mut bundle = rustls::RootCertStore::empty();
        bundle.add(x509_der.clone()).unwrap();
        bundle.add(root_der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let v = BrokerVerifier::new(bundle, &[x509_der.clone(), root_der], provider).unwrap();
        let forged = v.verify_server_cert(&leaf(&x509), &[], &name, &[], UnixTime::now());
        assert!(forged.is_err(), "with the workload CA in the CA file, its leaf passed for the broker");
    }
}
