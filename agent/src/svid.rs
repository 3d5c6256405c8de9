//! One SVID from the broker, checked before any workload sees it (RFD 0011):
//! the certificate certifies the key the agent made and names, as its only
//! URI SAN, exactly the SPIFFE ID the reply and its signed receipt name.

use anyhow::{bail, Context, Result};
use grantline_proto::audit::{Entry, Event};
use grantline_proto::kind::Kind;
use grantline_proto::wire::{self, ErrorCode};

use crate::session::Agent;

/// One X509-SVID with its key and the trust domain's bundles.
pub(crate) struct X509Svid {
    pub spiffe_id: String,
    pub trust_domain: String,
    /// Leaf first, then the intermediates (DER).
    pub chain_der: Vec<Vec<u8>>,
    pub chain_pem: String,
    /// PKCS#8, unencrypted, as the Workload API carries it.
    pub key_der: Vec<u8>,
    pub key_pem: String,
    /// The trust bundle's roots.
    pub bundle_der: Vec<Vec<u8>>,
    pub bundle_pem: String,
    /// The JWT signing keys (JWKS).
    pub jwt_bundle: String,
    pub serial: String,
    pub not_after: i64,
}

impl X509Svid {
    /// The trust domain's SPIFFE ID, which keys bundles.
    pub(crate) fn trust_domain_id(&self) -> String {
        format!("spiffe://{}", self.trust_domain)
    }
}

impl Drop for X509Svid {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.key_der.zeroize();
        self.key_pem.zeroize();
    }
}

/// Obtains an X509-SVID for `caller` under `role` (for the SPIFFE socket's
/// callers, and the agent's own x509-svid sinks), checked.
pub(crate) async fn obtain_x509(
    agent: &Agent,
    role: &str,
    ttl_seconds: u32,
    caller: &wire::Caller,
) -> Result<X509Svid, wire::Error> {
    let internal = |e: String| wire::Error::new(ErrorCode::Internal, e);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| internal(e.to_string()))?;
    // No name at all: the SVID's one name is the SPIFFE ID policy gives.
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| internal(e.to_string()))?;
    let g = wire::GrantRequest {
        kind: Kind::X509Svid.wire() as i32,
        role: role.to_owned(),
        ttl_seconds,
        csr_der: csr.der().to_vec(),
        caller: Some(caller.clone()),
        ..Default::default()
    };
    let gr = agent.grant(g).await?;
    x509_svid(&gr, &key).map_err(|e| {
        tracing::error!(error = %format!("{e:#}"), "the broker's X509-SVID does not check out; discarded");
        internal(format!("the broker's X509-SVID was discarded: {e:#}"))
    })
}

/// The receipt must record the SPIFFE ID the reply carries.
pub(crate) fn check_receipt_names(gr: &wire::GrantResponse) -> Result<()> {
    let entry = gr.receipt.as_ref().map(|r| Entry::decode(&r.entry)).transpose()?.context("no receipt")?;
    match entry.event()? {
        Event::Grant { spiffe_id, .. } if spiffe_id == gr.spiffe_id && !spiffe_id.is_empty() => Ok(()),
        _ => bail!("the receipt does not record SPIFFE ID {:?}", gr.spiffe_id),
    }
}

fn pem_ders(pem: &str, what: &str) -> Result<Vec<Vec<u8>>> {
    let ders: Vec<Vec<u8>> = rustls_pemfile::certs(&mut pem.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("the {what} is not PEM"))?;
    if ders.is_empty() {
        bail!("the reply carries no {what}");
    }
    Ok(ders)
}

/// Checks an X509-SVID reply against the key made for it: the certificate
/// certifies the key and names exactly the SPIFFE ID the reply and its
/// receipt name, as its only URI SAN.
pub(crate) fn x509_svid(gr: &wire::GrantResponse, key: &rcgen::KeyPair) -> Result<X509Svid> {
    crate::credentials::check_x509(gr, key)?;
    check_receipt_names(gr)?;
    let leaf_der = pem_ders(&gr.cert_pem, "certificate")?.swap_remove(0);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).context("the X509-SVID does not parse")?;
    let uris: Vec<&str> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris != [gr.spiffe_id.as_str()] {
        bail!("the X509-SVID's URI SANs {uris:?} are not exactly {:?}", gr.spiffe_id);
    }
    let serial = hex::encode(leaf.raw_serial());
    let mut chain_der = vec![leaf_der.clone()];
    chain_der.extend(pem_ders(&gr.chain_pem, "intermediate chain")?);
    let bundle_der = pem_ders(&gr.x509_bundle_pem, "X.509 trust bundle")?;
    if gr.trust_domain.is_empty() || !gr.spiffe_id.starts_with(&format!("spiffe://{}/", gr.trust_domain)) {
        bail!("{:?} is not in the reply's trust domain {:?}", gr.spiffe_id, gr.trust_domain);
    }
    Ok(X509Svid {
        spiffe_id: gr.spiffe_id.clone(),
        trust_domain: gr.trust_domain.clone(),
        chain_pem: format!("{}{}", gr.cert_pem, gr.chain_pem),
        chain_der,
        key_der: key.serialize_der(),
        key_pem: key.serialize_pem(),
        bundle_der,
        bundle_pem: gr.x509_bundle_pem.clone(),
        jwt_bundle: gr.jwt_bundle_json.clone(),
        serial,
        not_after: gr.not_after_unix,
    })
}
