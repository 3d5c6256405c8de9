//! Malformed frames and garbage on QUIC streams get an error reply, and the
//! broker keeps serving other agents.

#![allow(clippy::unwrap_used)]

use grantline_proto::wire::{self, ErrorCode};
use grantline_proto::{frame, ALPN};
use grantline_tests::raw::{client_config, client_config_alpn, connect, error_of, runtime, send_raw};
use grantline_tests::{stderr, Agent, Broker};

#[test]
fn garbage_gets_error_replies_and_other_agents_are_unaffected() {
    let broker = Broker::start();
    let agent = Agent::start(&broker, "steady");
    let ca = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    // Connect as the enrolled node, so that authenticated paths are reached too.
    let chain_pem = std::fs::read_to_string(agent.dir.path().join("node.pem")).unwrap();
    let chain: Vec<_> = rustls_pemfile::certs(&mut chain_pem.as_bytes()).map(Result::unwrap).collect();
    let key = std::fs::read_to_string(agent.dir.path().join("node.key")).unwrap();

    let mut oversized = Vec::new();
    prost::encoding::encode_varint((frame::MAX_FRAME_LEN + 100) as u64, &mut oversized);
    oversized.extend_from_slice(&[0; 16]);
    let valid = frame::encode(&wire::Request { body: None });
    let mut truncated = frame::encode(&wire::Request {
        body: Some(wire::request::Body::Grant(wire::GrantRequest { role: "dev".into(), ..Default::default() })),
    });
    truncated.pop();
    let bad_csr = frame::encode(&wire::Request {
        body: Some(wire::request::Body::Grant(wire::GrantRequest {
            kind: wire::CredentialKind::X509 as i32,
            role: "dev".into(),
            csr_der: b"definitely not DER".to_vec(),
            ..Default::default()
        })),
    });
    let bad_kind = frame::encode(&wire::Request {
        body: Some(wire::request::Body::Grant(wire::GrantRequest {
            kind: 99,
            role: "dev".into(),
            ..Default::default()
        })),
    });
    let too_big_stream = vec![7u8; frame::MAX_FRAME_LEN * 2];
    // A CSR that smuggles a name the request (and so policy) never saw.
    let smuggler_key = rcgen::KeyPair::generate().unwrap();
    let smuggling_csr = rcgen::CertificateParams::new(vec!["evil.example.com".to_owned()])
        .unwrap()
        .serialize_request(&smuggler_key)
        .unwrap()
        .der()
        .to_vec();
    let smuggler = frame::encode(&wire::Request {
        body: Some(wire::request::Body::Grant(wire::GrantRequest {
            kind: wire::CredentialKind::X509 as i32,
            role: "dev".into(),
            csr_der: smuggling_csr,
            sans: vec!["ok.example.com".into()],
            ..Default::default()
        })),
    });
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("random bytes", vec![0xde, 0xad, 0xbe, 0xef, 0x01, 0x02], "frame"),
        ("empty stream", vec![], "empty frame"),
        ("oversized length", oversized, "too large"),
        ("stream over the limit", too_big_stream, "larger than"),
        ("truncated frame", truncated, "declares"),
        ("empty request", valid, "empty request"),
        ("bad CSR", bad_csr, "CSR"),
        ("unknown kind", bad_kind, "unknown credential kind"),
        ("CSR with names not requested", smuggler, "the CSR names \"evil.example.com\""),
    ];
    runtime().block_on(async {
        let conn = connect(&broker.addr, client_config(&ca, Some((chain, key)))).await.unwrap();
        for (name, bytes, want) in &cases {
            let resp = send_raw(&conn, bytes).await.unwrap_or_else(|e| panic!("{name}: no reply: {e}"));
            let (code, msg) = error_of(&resp);
            assert_eq!(code, ErrorCode::BadRequest, "{name}: {msg}");
            assert!(msg.contains(want), "{name}: {msg:?} lacks {want:?}");
        }
        // The same connection still works after all that.
        let resp = send_raw(&conn, &frame::encode(&wire::Request { body: None })).await.unwrap();
        assert_eq!(error_of(&resp).0, ErrorCode::BadRequest);

        // A client speaking another ALPN is refused at the handshake.
        assert_ne!(ALPN, b"h3");
        let other = client_config_alpn(&ca, None, b"h3");
        assert!(connect(&broker.addr, other).await.is_err());
    });

    // Meanwhile the real agent is served as before.
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["x509", "--role", "dev", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}

#[test]
fn garbage_on_the_local_socket_gets_an_error_and_the_agent_keeps_serving() {
    use std::io::{Read, Write};
    let broker = Broker::start();
    let agent = Agent::start(&broker, "local");
    let mut s = std::os::unix::net::UnixStream::connect(agent.socket()).unwrap();
    s.write_all(b"\x05hello").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let resp: wire::LocalResponse = frame::decode(&buf).unwrap();
    match resp.body {
        Some(wire::local_response::Body::Error(e)) => assert_eq!(e.code, ErrorCode::BadRequest as i32, "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["ssh", "--role", "dev", "--principal", "bob", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
}
