//! Grantline patch (`PATCHES.md`): a server that releases its rustls
//! connection once the handshake is over.

use lazy_static::lazy_static;

use super::*;
use crate::crypto::rustls::{HandshakeData, QuicClientConfig};

const ALPN: &[u8] = b"grantline";

lazy_static! {
    static ref CLIENT_KEY: rcgen::CertifiedKey<rcgen::KeyPair> =
        rcgen::generate_simple_self_signed(vec!["client.example".into()]).unwrap();
}

fn releasing_server(client_auth: bool) -> ServerConfig {
    let provider = Arc::new(default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap();
    let builder = if client_auth {
        let mut roots = RootCertStore::empty();
        roots.add(CLIENT_KEY.cert.der().clone()).unwrap();
        builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap(),
        )
    } else {
        builder.with_no_client_auth()
    };
    let key = PrivatePkcs8KeyDer::from(CERTIFIED_KEY.signing_key.serialize_der());
    let mut config = builder
        .with_single_cert(vec![CERTIFIED_KEY.cert.der().clone()], key.into())
        .unwrap();
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = u32::MAX;
    let crypto = QuicServerConfig::try_from(config)
        .unwrap()
        .release_tls_after_handshake(true);
    ServerConfig::with_crypto(Arc::new(crypto))
}

fn client(client_auth: bool) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add(CERTIFIED_KEY.cert.der().clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = if client_auth {
        let key = PrivatePkcs8KeyDer::from(CLIENT_KEY.signing_key.serialize_der());
        builder
            .with_client_auth_cert(vec![CLIENT_KEY.cert.der().clone()], key.into())
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.enable_early_data = true;
    ClientConfig::new(Arc::new(QuicClientConfig::try_from(config).unwrap()))
}

fn client_to_server(
    pair: &mut Pair,
    client_ch: ConnectionHandle,
    server_ch: ConnectionHandle,
    msg: &[u8],
) {
    let s = pair.client_streams(client_ch).open(Dir::Uni).unwrap();
    pair.client_send(client_ch, s).write(msg).unwrap();
    pair.client_send(client_ch, s).finish().unwrap();
    pair.drive();
    assert_eq!(pair.server_streams(server_ch).accept(Dir::Uni), Some(s));
    let mut recv = pair.server_recv(server_ch, s);
    let mut chunks = recv.read(false).unwrap();
    assert_matches!(chunks.next(usize::MAX), Ok(Some(chunk)) if chunk.bytes == msg);
    let _ = chunks.finalize();
}

fn server_to_client(
    pair: &mut Pair,
    client_ch: ConnectionHandle,
    server_ch: ConnectionHandle,
    msg: &[u8],
) {
    let s = pair.server_streams(server_ch).open(Dir::Uni).unwrap();
    pair.server_send(server_ch, s).write(msg).unwrap();
    pair.server_send(server_ch, s).finish().unwrap();
    pair.drive();
    assert_eq!(pair.client_streams(client_ch).accept(Dir::Uni), Some(s));
    let mut recv = pair.client_recv(client_ch, s);
    let mut chunks = recv.read(false).unwrap();
    assert_matches!(chunks.next(usize::MAX), Ok(Some(chunk)) if chunk.bytes == msg);
    let _ = chunks.finalize();
}

/// Starts a key update on `side` and checks that it happened. First lets
/// both sides' key-discard timers fire (`Pair::drive` stops while only those
/// are left): until then a side that just followed an update ignores a new one.
fn update_keys(
    pair: &mut Pair,
    client_ch: ConnectionHandle,
    server_ch: ConnectionHandle,
    side: Side,
) {
    pair.time += Duration::from_secs(1);
    pair.drive();
    let conn = match side {
        Side::Client => pair.client_conn_mut(client_ch),
        Side::Server => pair.server_conn_mut(server_ch),
    };
    let phase = conn.key_phase();
    conn.force_key_update();
    assert_ne!(
        conn.key_phase(),
        phase,
        "the {side:?}'s key update did not happen"
    );
}

#[test]
fn a_released_session_keeps_its_identity_and_updates_its_keys() {
    let _guard = subscribe();
    let mut pair = Pair::new(Default::default(), releasing_server(true));
    let (client_ch, server_ch) = pair.connect_with(client(true));

    // The exporter needs rustls' secrets: gone on the server, kept on the client.
    let mut buf = [0u8; 32];
    let server = pair.server_conn_mut(server_ch).crypto_session();
    assert!(
        server
            .export_keying_material(&mut buf, b"label", b"context")
            .is_err()
    );
    assert!(!server.is_handshaking());
    let data = server
        .handshake_data()
        .unwrap()
        .downcast::<HandshakeData>()
        .unwrap();
    assert_eq!(data.protocol.as_deref(), Some(ALPN));
    assert_eq!(data.server_name.as_deref(), Some("localhost"));
    let certs = server
        .peer_identity()
        .unwrap()
        .downcast::<Vec<CertificateDer<'static>>>()
        .unwrap();
    assert_eq!(*certs, vec![CLIENT_KEY.cert.der().clone()]);
    let client = pair.client_conn_mut(client_ch).crypto_session();
    assert!(
        client
            .export_keying_material(&mut buf, b"label", b"context")
            .is_ok()
    );

    client_to_server(&mut pair, client_ch, server_ch, b"before any update");
    server_to_client(&mut pair, client_ch, server_ch, b"reply");
    update_keys(&mut pair, client_ch, server_ch, Side::Client);
    client_to_server(
        &mut pair,
        client_ch,
        server_ch,
        b"after the client's update",
    );
    server_to_client(&mut pair, client_ch, server_ch, b"reply in the new keys");
    update_keys(&mut pair, client_ch, server_ch, Side::Server);
    server_to_client(
        &mut pair,
        client_ch,
        server_ch,
        b"after the server's update",
    );
    client_to_server(&mut pair, client_ch, server_ch, b"reply in the newest keys");

    assert_eq!(
        pair.client_conn_mut(client_ch).key_phase(),
        pair.server_conn_mut(server_ch).key_phase()
    );
    assert_eq!(pair.client_conn_mut(client_ch).stats().path.lost_packets, 0);
    assert_eq!(pair.server_conn_mut(server_ch).stats().path.lost_packets, 0);
}

#[test]
fn a_releasing_server_sends_its_tickets_first() {
    let _guard = subscribe();
    let mut pair = Pair::new(Default::default(), releasing_server(false));
    pair.server.handle_incoming = Box::new(validate_incoming);
    let config = client(false);

    let client_ch = pair.begin_connect(config.clone());
    pair.drive();
    pair.server.assert_accept();
    pair.client
        .connections
        .get_mut(&client_ch)
        .unwrap()
        .close(pair.time, VarInt(0), [][..].into());
    pair.drive();

    pair.client.addr = SocketAddr::new(
        Ipv6Addr::LOCALHOST.into(),
        CLIENT_PORTS.lock().unwrap().next().unwrap(),
    );
    let client_ch = pair.begin_connect(config);
    assert!(
        pair.client_conn_mut(client_ch).has_0rtt(),
        "the client holds no ticket from the first connection"
    );
    pair.drive();
    assert!(pair.client_conn_mut(client_ch).accepted_0rtt());
    let server_ch = pair.server.assert_accept();
    let mut buf = [0u8; 32];
    assert!(
        pair.server_conn_mut(server_ch)
            .crypto_session()
            .export_keying_material(&mut buf, b"label", b"context")
            .is_err(),
        "the resumed session was released too"
    );
    client_to_server(&mut pair, client_ch, server_ch, b"resumed");
}

#[test]
fn the_next_phase_keys_are_derived_only_for_a_key_update() {
    let _guard = subscribe();
    let mut pair = Pair::default();
    let (client_ch, server_ch) = pair.connect();
    client_to_server(&mut pair, client_ch, server_ch, b"hello");
    server_to_client(&mut pair, client_ch, server_ch, b"hello back");
    assert!(!pair.client_conn_mut(client_ch).holds_next_keys());
    assert!(!pair.server_conn_mut(server_ch).holds_next_keys());

    // Each side updates twice; the peer follows with the keys it derives then.
    for _ in 0..2 {
        update_keys(&mut pair, client_ch, server_ch, Side::Client);
        client_to_server(
            &mut pair,
            client_ch,
            server_ch,
            b"in the client's new phase",
        );
        server_to_client(&mut pair, client_ch, server_ch, b"answered in it");
        update_keys(&mut pair, client_ch, server_ch, Side::Server);
        server_to_client(
            &mut pair,
            client_ch,
            server_ch,
            b"in the server's new phase",
        );
        client_to_server(&mut pair, client_ch, server_ch, b"answered in it");
    }
    assert!(!pair.client_conn_mut(client_ch).holds_next_keys());
    assert!(!pair.server_conn_mut(server_ch).holds_next_keys());
    assert_eq!(
        pair.client_conn_mut(client_ch).key_phase(),
        pair.server_conn_mut(server_ch).key_phase()
    );
    assert_eq!(pair.client_conn_mut(client_ch).stats().path.lost_packets, 0);
    assert_eq!(pair.server_conn_mut(server_ch).stats().path.lost_packets, 0);
}

#[test]
fn the_handshake_spaces_give_back_their_buffers_once_discarded() {
    let _guard = subscribe();
    let mut pair = Pair::new(Default::default(), releasing_server(true));
    let (client_ch, server_ch) = pair.connect_with(client(true));
    client_to_server(&mut pair, client_ch, server_ch, b"hello");
    server_to_client(&mut pair, client_ch, server_ch, b"hello back");
    assert!(
        pair.server_conn_mut(server_ch)
            .handshake_spaces_hold_nothing()
    );
    assert!(
        pair.client_conn_mut(client_ch)
            .handshake_spaces_hold_nothing()
    );
}

#[test]
fn drained_event_queues_give_back_their_buffers() {
    let _guard = subscribe();
    let mut pair = Pair::default();
    let (client_ch, server_ch) = pair.connect();
    client_to_server(&mut pair, client_ch, server_ch, b"hello");
    server_to_client(&mut pair, client_ch, server_ch, b"hello back");
    let drained = |conn: &mut Connection| {
        while conn.poll().is_some() {}
        while conn.poll_endpoint_events().is_some() {}
        !conn.event_queues_hold_buffers()
    };
    assert!(drained(pair.server_conn_mut(server_ch)));
    assert!(drained(pair.client_conn_mut(client_ch)));
}

#[test]
fn drained_send_queues_give_back_their_buffers() {
    let _guard = subscribe();
    let mut pair = Pair::new(Default::default(), releasing_server(true));
    let (client_ch, server_ch) = pair.connect_with(client(true));
    client_to_server(&mut pair, client_ch, server_ch, b"hello");
    server_to_client(&mut pair, client_ch, server_ch, b"hello back");
    pair.drive();
    assert!(!pair.server_conn_mut(server_ch).send_queues_hold_buffers());
    assert!(!pair.client_conn_mut(client_ch).send_queues_hold_buffers());
}
