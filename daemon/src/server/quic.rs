//! The QUIC side: the endpoint (stateless resets that survive restarts,
//! session tickets, flow control sized for small frames), and each
//! connection: the handshake, the node's registration in the registry, one
//! stream per request, and the certificate-less connections of enrollment.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use grantline_proto::clock::now_unix;
use grantline_proto::files::{read_secret, write_secret};
use grantline_proto::{frame, wire, ALPN};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::WebPkiClientVerifier;

use super::identity::{self, PeerNode};
use super::shared::Shared;
use super::{admission, anonymous, handler, revoke, tickets};
use crate::pki::Pki;
use crate::registry::Admitted;

/// Binds the QUIC endpoint with a stateless-reset key kept in the state
/// directory: after a restart (even a SIGKILL) the broker answers packets of
/// connections it no longer knows with a reset the agents recognize, so they
/// reconnect at once instead of waiting out the idle timeout.
pub(super) fn bind(dir: &Path, cfg: quinn::ServerConfig, listen: SocketAddr) -> Result<quinn::Endpoint> {
    let path = dir.join("quic-reset.key");
    let secret = if path.exists() {
        hex::decode(read_secret(&path)?.trim())
            .ok()
            .filter(|k| k.len() == 32)
            .with_context(|| format!("{} is not 32 hex-encoded bytes", path.display()))?
    } else {
        let k = rand::random::<[u8; 32]>().to_vec();
        write_secret(&path, hex::encode(&k).as_bytes())?;
        k
    };
    let reset_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
    // Connection IDs carry a MAC under a key derived from the same secret, so
    // a restarted broker still recognizes its old IDs as its own and answers
    // them with a stateless reset instead of dropping them.
    let cid_key = u64::from_be_bytes(
        aws_lc_rs::hmac::sign(&reset_key, b"grantline quic connection id key").as_ref()[..8].try_into()?,
    );
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    let socket = std::net::UdpSocket::bind(listen)
        .with_context(|| format!("cannot listen on {listen} (is another broker running there?)"))?;
    // Every agent shares this one socket: a reconnect storm's Initial packets
    // arrive in bursts that overflow the default buffer, and each one dropped
    // costs its agent a retransmission timeout. The kernel caps the request
    // at net.core.rmem_max.
    if let Err(e) = nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBuf, &UDP_RECEIVE_BUFFER) {
        tracing::warn!(error = %e, "cannot enlarge the UDP receive buffer");
    }
    Ok(quinn::Endpoint::new(endpoint_config, Some(cfg), socket, Arc::new(quinn::TokioRuntime))?)
}

/// The UDP receive buffer asked for (the kernel grants up to rmem_max).
const UDP_RECEIVE_BUFFER: usize = 8 << 20;

/// The endpoint's configuration; node identities must chain to one of
/// `node_cas` (this broker's node CA, and in a fleet every broker's).
pub(super) fn server_config(
    pki: &Pki,
    node_cas: &[rustls::pki_types::CertificateDer<'static>],
    tickets: Arc<tickets::TicketKeys>,
) -> Result<quinn::ServerConfig> {
    let tls = server_tls(pki, node_cas, tickets)?;
    // Each connection drops its rustls state once the handshake and its
    // session tickets are done (third_party/quinn-proto/PATCHES.md): ~4 KB
    // per agent; the broker reads the peer identity, which stays. RFD 0008,
    // "A connection's memory, cut".
    let crypto = QuicServerConfig::try_from(tls)?.release_tls_after_handshake(true);
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(8u32.into())
        .max_concurrent_uni_streams(0u32.into())
        // A request of the largest legal size, or twice that (which is
        // answered with an error), fits in one flight.
        .stream_receive_window(u32::try_from(4 * frame::MAX_FRAME_LEN)?.into())
        .receive_window(u32::try_from(16 * frame::MAX_FRAME_LEN)?.into())
        .send_window(16 * frame::MAX_FRAME_LEN as u64)
        // Replies are a few kilobytes: segmentation offload would only
        // size every connection's transmit buffer for ten datagrams.
        .enable_segmentation_offload(false)
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0)
        // No path-MTU probes: an agent's messages are a few kilobytes, which
        // QUIC's guaranteed 1,200 bytes carry in as many datagrams, and each
        // connection's probes (and the acknowledgements of its agent's) were
        // a third of a restart storm's datagrams (RFD 0008).
        .mtu_discovery_config(None)
        .max_idle_timeout(Some(Duration::from_secs(60).try_into()?));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// The broker's TLS 1.3 configuration, before QUIC wraps it.
fn server_tls(
    pki: &Pki,
    node_cas: &[rustls::pki_types::CertificateDer<'static>],
    tickets: Arc<tickets::TicketKeys>,
) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in node_cas {
        // One unusable CA must not shut out the others' nodes.
        if let Err(e) = roots.add(ca.clone()) {
            tracing::error!(error = %e, "a node CA is not a usable trust anchor; skipped");
        }
    }
    // Enrollment happens before a node has a certificate, so a handshake
    // without one is allowed; every request but Enroll then requires one.
    // A certificate that is presented must chain to the node CA.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // Reconnecting agents resume their sessions, across restarts too.
    tls.ticketer = tickets;
    tls.send_tls13_tickets = 1;
    // The client's order of cipher suites decides (rustls' default): the
    // agent asks for AES-128-GCM first (`grantline_agent::tls::provider`),
    // and a session ticket resumes only under its own suite, so a broker
    // choosing by its own order would turn every ticket an older agent holds
    // into a full handshake at the restart that upgrades it (RFD 0003).
    Ok(tls)
}

pub(super) fn serve_connection(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    slot: admission::Slot,
) -> impl std::future::Future<Output = ()> {
    let remote = incoming.remote_address();
    // The handshake, an anonymous connection and the first-use check run in
    // futures of their own on the heap, and this task gets the incoming
    // connection in a box (an async fn keeps its arguments' room for its
    // whole life): the task lives as long as its connection, and its idle
    // state is what a connected agent costs here (RFD 0008, "A
    // connection's memory, cut").
    serve_connected(shared, remote, Box::pin(handshake(incoming, slot)))
}

async fn serve_connected(
    shared: Arc<Shared>,
    remote: std::net::SocketAddr,
    handshake: std::pin::Pin<Box<impl std::future::Future<Output = Option<quinn::Connection>>>>,
) {
    let Some(conn) = handshake.await else { return };
    let peer = PeerNode::from_connection(&conn);
    tracing::debug!(%remote, node = peer.as_ref().map(|p| p.name.as_str()), "connected");
    let _counted = ConnectionGauge::new();
    let Some(peer) = peer else {
        Box::pin(serve_anonymous(&shared, &conn, remote)).await;
        return;
    };
    let registered = Registration::new(&shared, &peer, &conn);
    if registered.first_use && !Box::pin(confirm_first_use(&shared, &peer, &conn)).await {
        return;
    }
    let peer = Some(peer);
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let shared2 = shared.clone();
                let peer = peer.clone();
                shared.requests.spawn(async move { serve_stream(shared2, peer, send, recv).await });
            }
            Err(e) => {
                tracing::debug!(%remote, reason = %e, "connection closed");
                break;
            }
        }
    }
}

/// Completes the handshake within 10 s, counting a failure or a timeout;
/// the admission slot is given back either way.
async fn handshake(incoming: quinn::Incoming, slot: admission::Slot) -> Option<quinn::Connection> {
    let remote = incoming.remote_address();
    let handshake = tokio::time::timeout(Duration::from_secs(10), async { incoming.accept()?.await }).await;
    drop(slot);
    match handshake {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => {
            metrics::counter!("grantline_handshakes_total", "outcome" => "failed").increment(1);
            tracing::info!(%remote, error = %e, "handshake failed");
            None
        }
        Err(_) => {
            metrics::counter!("grantline_handshakes_total", "outcome" => "timed_out").increment(1);
            tracing::info!(%remote, "handshake timed out");
            None
        }
    }
}

/// A connection without a node identity: admitted within the per-address
/// and overall limits, it may carry one request (an enrollment) within
/// `anonymous::WINDOW`, then it is closed.
async fn serve_anonymous(shared: &Arc<Shared>, conn: &quinn::Connection, remote: std::net::SocketAddr) {
    let Some(_slot) = shared.anonymous.admit(remote.ip()) else {
        metrics::counter!("grantline_anonymous_refused_total").increment(1);
        let e = wire::Error::new(
            wire::ErrorCode::Unavailable,
            format!(
                "too many connections without a node identity from {} (at most {} at once, {} in all); \
                 enroll one node at a time",
                remote.ip(),
                anonymous::PER_ADDRESS,
                anonymous::IN_ALL
            ),
        );
        revoke::close_with(conn, &e);
        return;
    };
    if let Ok(Ok((send, recv))) = tokio::time::timeout(anonymous::WINDOW, conn.accept_bi()).await {
        let served = shared.requests.spawn(serve_stream(shared.clone(), None, send, recv));
        let _ = served.await;
    }
    conn.close(0u32.into(), b"one request per connection without a node identity");
}

async fn serve_stream(
    shared: Arc<Shared>,
    peer: Option<PeerNode>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let reply = match tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(frame::MAX_FRAME_LEN + 16)).await {
        Err(_) => {
            error(wire::ErrorCode::BadRequest, "request not received within 10 s; send one frame and finish the stream")
        }
        Ok(Err(quinn::ReadToEndError::TooLong)) => {
            error(wire::ErrorCode::BadRequest, format!("request larger than {} bytes", frame::MAX_FRAME_LEN))
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "stream failed before a request arrived");
            return;
        }
        Ok(Ok(buf)) => match frame::decode::<wire::Request>(&buf) {
            Ok(req) => handler::handle(&shared, peer.as_ref(), req).await,
            Err(e) => error(wire::ErrorCode::BadRequest, e.to_string()),
        },
    };
    if send.write_all(&frame::encode(&reply)).await.is_ok() {
        let _ = send.finish();
        // Keep the stream alive until the peer has the reply or goes away.
        let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
    }
}

/// A node's connection in the registry while it is up. Registered before
/// the revocation flag is read, so `revoke_node` (which sets the flag, then
/// takes the live connections) either finds the connection or the
/// connection finds the flag.
struct Registration<'a> {
    shared: &'a Shared,
    node: String,
    id: usize,
    /// Whether the registry let it stay (a refused one is not "seen").
    admitted: bool,
    /// The first connection with the node's current identity.
    first_use: bool,
}

impl<'a> Registration<'a> {
    /// Registers the connection of `peer`, then closes it at once if the
    /// node is revoked, is not enrolled, presents an identity that is no
    /// longer its own, or already holds its share of connections.
    fn new(shared: &'a Shared, peer: &PeerNode, conn: &quinn::Connection) -> Self {
        let node = peer.name.as_str();
        let id = conn.stable_id();
        let mut first_use = false;
        let refusal = match shared.registry.admit(node, &peer.serial, id, conn.clone(), now_unix()) {
            Admitted::Yes => None,
            Admitted::FirstUse => {
                first_use = true;
                None
            }
            Admitted::Refused(why) => Some(identity::refused(&why, node, &peer.serial)),
            Admitted::TooMany(most) => Some(wire::Error::new(
                wire::ErrorCode::Unavailable,
                format!("node {node} already holds {most} connections; use one"),
            )),
        };
        if let Some(e) = &refusal {
            revoke::close_with(conn, e);
        }
        Self { shared, node: node.to_owned(), id, admitted: refusal.is_none(), first_use }
    }
}

/// The first connection with a node's current identity, in a fleet: the
/// store must know it before the connection serves anything, so no broker
/// lets the identity it replaced renew afterwards. False (and the
/// connection closed) if the store cannot be told, or the identity was
/// replaced meanwhile at another broker.
async fn confirm_first_use(shared: &Shared, peer: &PeerNode, conn: &quinn::Connection) -> bool {
    let Some(fleet) = &shared.fleet else { return true };
    match crate::state::StateStore::mark_current_seen(&fleet.store, &peer.name, &peer.serial).await {
        Ok(true) => true,
        Ok(false) => {
            let e = wire::Error::new(
                wire::ErrorCode::Unauthenticated,
                crate::state::replaced_identity(&peer.name, &peer.serial),
            );
            revoke::close_with(conn, &e);
            false
        }
        Err(e) => {
            shared.registry.unmark_current_seen(&peer.name, &peer.serial);
            tracing::warn!(node = %peer.name, error = %format!("{e:#}"), "cannot record that a renewed identity is in use");
            let mut bye = wire::Error::new(
                wire::ErrorCode::Unavailable,
                "the broker cannot reach the fleet's database to record this identity's first use; retry",
            );
            (bye.retryable, bye.retry_after_ms) = (true, 1000);
            revoke::close_with(conn, &bye);
            false
        }
    }
}

/// Counts a connection in `grantline_connections` while it is up.
struct ConnectionGauge;

impl ConnectionGauge {
    fn new() -> Self {
        metrics::gauge!("grantline_connections").increment(1.0);
        Self
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!("grantline_connections").decrement(1.0);
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shared.registry.leave(&self.node, self.id, self.admitted.then(now_unix));
    }
}

fn error(code: wire::ErrorCode, msg: impl Into<String>) -> wire::Response {
    wire::Response { body: Some(wire::response::Body::Error(wire::Error::new(code, msg))) }
}

#[cfg(test)]
mod tests;
