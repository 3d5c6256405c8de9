//! The OIDC discovery endpoint of the trust domain (RFD 0011): HTTPS, two
//! documents, both public: `{issuer}/.well-known/openid-configuration` and
//! the JWKS at `{issuer}/keys`, so that a cloud provider can federate with
//! the JWT-SVIDs this broker signs. Nothing here reads a request body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::options::OidcOptions;
use crate::pki::Pki;
use crate::spiffe::{discovery_document, JwtKey};

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;
/// A TLS handshake, or a request's headers, must arrive within this.
const DEADLINE: Duration = Duration::from_secs(10);

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

/// Binds the endpoint. Without configured certificate files it serves the
/// broker's own server certificate (its names are the broker's `server_names`).
pub(crate) fn bind(opts: &OidcOptions, pki: &Pki, jwt: &JwtKey) -> Result<Oidc> {
    let listener = std::net::TcpListener::bind(opts.listen)
        .with_context(|| format!("cannot listen on {} for [spiffe.oidc]", opts.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let issuer = opts.issuer.clone().unwrap_or_else(|| format!("https://{}", display_addr(addr)));
    let (chain, key) = match &opts.tls {
        Some((cert, key)) => read_tls_files(cert, key)?,
        None => (pki.server_chain.clone(), pki.server_key.clone_key()),
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
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = open.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept on the OIDC endpoint");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, documents) = (oidc.acceptor.clone(), oidc.documents.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(tls)) = tokio::time::timeout(DEADLINE, acceptor.accept(stream)).await else { return };
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let documents = documents.clone();
                async move { Ok::<_, Infallible>(respond(&req, &documents)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(DEADLINE)
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
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
