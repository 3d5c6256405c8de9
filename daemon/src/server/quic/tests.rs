use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256};

use super::*;

/// Runs a TLS 1.3 handshake in memory; the suite the client ends up with.
fn handshake(server: &Arc<rustls::ServerConfig>, client: rustls::ClientConfig) -> rustls::CipherSuite {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut client = rustls::Connection::from(rustls::ClientConnection::new(Arc::new(client), name).unwrap());
    let mut server = rustls::Connection::from(rustls::ServerConnection::new(server.clone()).unwrap());
    for _ in 0..16 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return client.negotiated_cipher_suite().unwrap().suite();
        }
        flight(&mut client, &mut server);
        flight(&mut server, &mut client);
    }
    panic!("the handshake did not finish");
}

/// Moves what `from` has to send to `to`, which processes it.
fn flight(from: &mut rustls::Connection, to: &mut rustls::Connection) {
    let mut bytes = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut bytes).unwrap();
    }
    let mut rd = &bytes[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets().unwrap();
    }
}

/// The broker follows the client's order of cipher suites: the agent's
/// (AES-128-GCM/SHA-256 first) gets AES-128-GCM, rustls' default order
/// (AES-256 first, which older agents used) keeps AES-256-GCM, so the
/// session tickets those agents hold still resume after the broker's
/// upgrade (review: a broker choosing by its own order made every one of
/// them a full handshake at that restart); a client offering ChaCha20 alone
/// connects too.
#[test]
fn the_broker_follows_the_clients_order_of_cipher_suites() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::load_or_create(dir.path(), &["localhost".into()]).unwrap();
    let tickets = Arc::new(tickets::TicketKeys::open(dir.path()).unwrap());
    let server = Arc::new(server_tls(&pki, std::slice::from_ref(&pki.node_ca.cert_der), tickets).unwrap());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.root.cert_der.clone()).unwrap();
    let default = rustls::crypto::aws_lc_rs::default_provider();
    assert_eq!(default.cipher_suites[0].suite(), TLS13_AES_256_GCM_SHA384, "rustls' clients prefer AES-256");
    let mut aes_128_first = default.clone();
    aes_128_first.cipher_suites.sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256);
    let mut chacha_only = default.clone();
    chacha_only.cipher_suites.retain(|s| s.suite() == TLS13_CHACHA20_POLY1305_SHA256);
    for (provider, chosen) in [
        (aes_128_first, TLS13_AES_128_GCM_SHA256),
        (default, TLS13_AES_256_GCM_SHA384),
        (chacha_only, TLS13_CHACHA20_POLY1305_SHA256),
    ] {
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        client.alpn_protocols = vec![ALPN.to_vec()];
        assert_eq!(handshake(&server, client), chosen);
    }
}
