//! A raw QUIC client for tests that speak the wire protocol directly: with no
//! certificate, with a certificate of our own making, or with garbage.

use std::sync::Arc;

use grantline_proto::{frame, wire, ALPN};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub fn runtime() -> tokio::runtime::Runtime {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Client configuration trusting `ca_pem`, optionally presenting `identity`.
pub fn client_config(ca_pem: &str, identity: Option<(Vec<CertificateDer<'static>>, String)>) -> quinn::ClientConfig {
    client_config_alpn(ca_pem, identity, ALPN)
}

/// The same, speaking another ALPN protocol.
pub fn client_config_alpn(
    ca_pem: &str,
    identity: Option<(Vec<CertificateDer<'static>>, String)>,
    alpn: &[u8],
) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((chain, key_pem)) => {
            let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
            b.with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()))
}

pub async fn connect(addr: &str, cfg: quinn::ClientConfig) -> Result<quinn::Connection, String> {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep.connect_with(cfg, addr, "127.0.0.1").map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
    Ok(conn)
}

/// Sends raw bytes on a new stream and decodes the broker's reply.
pub async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> Result<wire::Response, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    // The broker may answer and stop the stream before all of it is sent.
    let wrote = send.write_all(bytes).await;
    if wrote.is_ok() {
        send.finish().map_err(|e| e.to_string())?;
    }
    let buf = match (recv.read_to_end(1 << 20).await, wrote) {
        (Ok(buf), _) if !buf.is_empty() => buf,
        (_, Err(e)) => return Err(e.to_string()),
        (Ok(buf), Ok(())) => buf,
        (Err(e), Ok(())) => return Err(e.to_string()),
    };
    frame::decode(&buf).map_err(|e| e.to_string())
}

/// The error code of a reply, or a panic if it is not an error.
pub fn error_of(resp: &wire::Response) -> (wire::ErrorCode, String) {
    match &resp.body {
        Some(wire::response::Body::Error(e)) => (wire::ErrorCode::try_from(e.code).unwrap(), e.message.clone()),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// The identity an enrolled agent keeps in its state directory.
pub fn node_identity(state_dir: &std::path::Path) -> (Vec<CertificateDer<'static>>, String) {
    let pem = std::fs::read(state_dir.join("node.pem")).unwrap();
    let chain = rustls_pemfile::certs(&mut pem.as_slice()).map(Result::unwrap).collect();
    (chain, std::fs::read_to_string(state_dir.join("node.key")).unwrap())
}

/// How the broker refused `bytes` on `conn`: the error it replied with, or
/// the one it closed the connection with (it closes at once a connection
/// whose identity it no longer accepts).
pub async fn refusal_of(conn: &quinn::Connection, bytes: &[u8]) -> (wire::ErrorCode, String) {
    if let Ok(resp) = send_raw(conn, bytes).await {
        return error_of(&resp);
    }
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let e: wire::Error =
                prost::Message::decode(close.reason.as_ref()).expect("the close reason is a wire error");
            (wire::ErrorCode::try_from(e.code).unwrap_or(wire::ErrorCode::Internal), e.message)
        }
        other => panic!("the connection ended without a reason: {other}"),
    }
}
