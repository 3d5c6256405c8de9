//! The OIDC discovery endpoint of the trust domain (RFD 0011): HTTPS, two
//! documents, both public: `{issuer}/.well-known/openid-configuration` and
//! the JWKS at `{issuer}/keys`, so that a cloud provider can federate with
//! the JWT-SVIDs this broker signs. Nothing here reads a request body.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use grantline_proto::slots::Slots;

use super::options::OidcOptions;
use crate::spiffe::{discovery_document, JwtKey};

/// Connections served at once, and from one source address (an IPv6 /64
/// counts as one): past either, a connection is closed at once, so a
/// few hosts holding idle connections cannot lock relying parties out.
const MAX_CONNECTIONS: usize = 256;
const PER_SOURCE: usize = 8;
/// A TLS handshake, or a request's headers, must arrive within this.
const DEADLINE: Duration = Duration::from_secs(3);
/// The longest a connection is kept, however busy: its slot is freed.
const LIFETIME: Duration = Duration::from_secs(30);
/// Where the endpoint's own trust anchor is written (no certificate files).
pub const OIDC_CA_FILE: &str = "oidc-ca.pem";

/// A bound endpoint, ready to serve.
pub(crate) struct Oidc {
    listener: std::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    /// The issuer URL without a trailing slash.
    pub(crate) issuer: String,
    documents: Arc<Documents>,
}

struct Documents {
    /// The issuer URL's path ("" or "/path"), under which both are served.
    prefix: String,
    discovery: Bytes,
    jwks: Bytes,
}

/// Binds the endpoint. Without configured certificate files it serves a
/// certificate of its own (see [`own_certificate`]).
pub(crate) fn bind(opts: &OidcOptions, state_dir: &Path, jwt: &JwtKey) -> Result<Oidc> {
    let listener = std::net::TcpListener::bind(opts.listen)
        .with_context(|| format!("cannot listen on {} for [spiffe.oidc]", opts.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let issuer = opts.issuer.clone().unwrap_or_else(|| format!("https://{}", display_addr(addr)));
    let (chain, key) = match &opts.tls {
        Some((cert, key)) => read_tls_files(cert, key)?,
        None => {
            let host = url::Url::parse(&issuer).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
            own_certificate(state_dir, host.trim_start_matches('[').trim_end_matches(']'))?
        }
    };
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("[spiffe.oidc]: the TLS certificate and key do not go together")?;
    let prefix = url::Url::parse(&issuer).map(|u| u.path().trim_end_matches('/').to_owned()).unwrap_or_default();
    let documents =
        Documents { prefix, discovery: Bytes::from(discovery_document(&issuer)), jwks: Bytes::from(jwt.jwks("sig")) };
    Ok(Oidc { listener, acceptor: Arc::new(config).into(), issuer, documents: Arc::new(documents) })
}

/// The endpoint's certificate when no files are configured: a leaf for the
/// issuer's host under a CA made for it alone at this start, whose key is
/// dropped at once, so that CA can never sign anything else. Its
/// certificate is written to `STATE_DIR/oidc-ca.pem` for relying parties
/// to trust (again after each restart). The broker's root is not used: it
/// also signs workload leaves, and a node granted one for the issuer's host
/// could then pose as the endpoint and serve its own keys. A cloud provider
/// needs a publicly trusted certificate: configure `tls_cert_file`.
fn own_certificate(state_dir: &Path, host: &str) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate_for(alg)?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ca.distinguished_name.push(DnType::CommonName, "Grantline OIDC endpoint (single-use CA)");
    ca.not_before = now - time::Duration::minutes(5);
    ca.not_after = now + time::Duration::days(398);
    ca.serial_number = Some(crate::pki::random_serial());
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate_for(alg)?;
    let mut leaf = CertificateParams::default();
    let san = crate::pki::parse_san(host)
        .map_err(|e| anyhow::anyhow!("[spiffe.oidc] issuer host {host:?}: {e}; set issuer to an https:// URL"))?;
    leaf.subject_alt_names = vec![san];
    leaf.distinguished_name.push(DnType::CommonName, "grantlined OIDC");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.not_before = now - time::Duration::minutes(5);
    leaf.not_after = now + time::Duration::days(397);
    leaf.serial_number = Some(crate::pki::random_serial());
    leaf.use_authority_key_identifier_extension = true;
    let cert = leaf.signed_by(&key, &issuer)?;
    drop(issuer);
    let anchor = state_dir.join(OIDC_CA_FILE);
    grantline_proto::files::write_atomic(&anchor, ca_cert.pem().as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", anchor.display()))?;
    let key_der = PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((vec![cert.der().clone(), ca_cert.der().clone()], key_der))
}

fn display_addr(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

fn read_tls_files(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let pem = grantline_proto::files::read_bounded(cert, grantline_proto::files::MAX_SECRET_FILE)
        .with_context(|| format!("cannot read {}", cert.display()))?;
    let chain = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
    let key_pem = grantline_proto::files::read_secret(key)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .with_context(|| format!("{} is not a PEM private key", key.display()))?
        .with_context(|| format!("{} holds no private key", key.display()))?;
    Ok((chain, key))
}

/// Serves until the task is dropped. A failing accept is waited out.
pub(crate) async fn serve(oidc: Oidc) {
    let listener = match tokio::net::TcpListener::from_std(oidc.listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "the OIDC listener failed");
            return;
        }
    };
    let open = Slots::new(MAX_CONNECTIONS);
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept on the OIDC endpoint");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Past the bounds the connection is closed (dropped) at once.
        let Some(slot) = open.take(source(from.ip()), PER_SOURCE) else { continue };
        let (acceptor, documents) = (oidc.acceptor.clone(), oidc.documents.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(Ok(tls)) = tokio::time::timeout(DEADLINE, acceptor.accept(stream)).await else { return };
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let documents = documents.clone();
                async move { Ok::<_, Infallible>(respond(&req, &documents)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(DEADLINE)
                .serve_connection(TokioIo::new(tls), service);
            let _ = tokio::time::timeout(LIFETIME, conn).await;
        });
    }
}

/// What connections are counted by: the address, or an IPv6 address's /64
/// (one host commonly holds a whole /64).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(v6.to_bits() & (!0u128 << 64))),
        },
    }
}

fn respond(req: &Request<Incoming>, documents: &Documents) -> Response<Full<Bytes>> {
    let path = req.uri().path().strip_prefix(documents.prefix.as_str()).unwrap_or("");
    let found = match path {
        "/.well-known/openid-configuration" => Some(documents.discovery.clone()),
        "/keys" => Some(documents.jwks.clone()),
        _ => None,
    };
    let (status, ctype, body) = match found {
        _ if req.method() != Method::GET && req.method() != Method::HEAD => {
            (StatusCode::METHOD_NOT_ALLOWED, "text/plain", Bytes::from_static(b"only GET is served here\n"))
        }
        Some(body) => (StatusCode::OK, "application/json", body),
        None => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"served here: /.well-known/openid-configuration and /keys under the issuer URL\n"),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
    resp.headers_mut()
        .insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("public, max-age=300"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Second review: the mask kept an IPv6 address's interface half and
    /// dropped its network, so one host's /64 counted as many sources.
    #[test]
    fn connections_are_counted_by_address_and_ipv6_by_its_64() {
        let ip = |s: &str| source(s.parse().unwrap());
        assert_eq!(ip("2001:db8::1"), ip("2001:db8::2"), "one /64 is one source");
        assert_ne!(ip("2001:db8:0:1::1"), ip("2001:db8:0:2::1"), "another /64 is another");
        assert_eq!(ip("2001:db8:0:1:ffff::9"), "2001:db8:0:1::".parse::<IpAddr>().unwrap());
        assert_eq!(ip("::ffff:10.0.0.1"), ip("10.0.0.1"), "a mapped IPv4 address is that address");
        assert_ne!(ip("10.0.0.1"), ip("10.0.0.2"));
    }
}
