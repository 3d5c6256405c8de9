//! Grantline patch 2 (`PATCHES.md`), over a real connection on loopback.

use std::sync::Arc;

use rustls::pki_types::PrivatePkcs8KeyDer;

use crate::{ClientConfig, Connection, Endpoint, ServerConfig};

fn transmit_buffer(conn: &Connection) -> usize {
    // The driver holds this lock for the whole of each poll, so what is seen
    // here is the state between two polls.
    conn.0.state.lock("test").send_buffer.capacity()
}

#[test]
fn a_connection_between_sends_holds_no_transmit_buffer() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let cert_der = cert.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
        let server_config = ServerConfig::with_single_cert(vec![cert_der.clone()], key.into())
            .expect("server config");
        let server =
            Endpoint::server(server_config, "127.0.0.1:0".parse().expect("addr")).expect("server");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_der).expect("root");
        let mut client = Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        client.set_default_client_config(
            ClientConfig::with_root_certificates(Arc::new(roots)).expect("client config"),
        );
        let addr = server.local_addr().expect("local addr");

        let echo = async {
            let conn = server
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("handshake");
            let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
            let request = recv.read_to_end(1 << 16).await.expect("request");
            send.write_all(&request).await.expect("reply");
            send.finish().expect("finish");
            send.stopped().await.expect("acknowledged");
            conn
        };
        let ask = async {
            let conn = client
                .connect(addr, "localhost")
                .expect("connect")
                .await
                .expect("handshake");
            let (mut send, mut recv) = conn.open_bi().await.expect("stream");
            // Larger than one datagram, so each side sends several packets.
            let request = vec![7u8; 20_000];
            send.write_all(&request).await.expect("request");
            send.finish().expect("finish");
            assert_eq!(recv.read_to_end(1 << 16).await.expect("reply"), request);
            conn
        };
        let (server_conn, client_conn) = tokio::join!(echo, ask);
        assert_eq!(
            transmit_buffer(&server_conn),
            0,
            "the server side kept its transmit buffer"
        );
        assert_eq!(
            transmit_buffer(&client_conn),
            0,
            "the client side kept its transmit buffer"
        );
    });
}
