//! Who may talk to the broker: unenrolled clients, foreign and expired
//! certificates, and reused or expired join tokens are all refused.

#![allow(clippy::unwrap_used)]

use grantline_proto::audit::Event;
use grantline_proto::{frame, wire};
use grantline_tests::raw::{client_config, connect, error_of, runtime, send_raw};
use grantline_tests::{stderr, Agent, Broker};
use rcgen::{CertificateParams, DnType, Issuer, KeyPair};
use time::{Duration, OffsetDateTime};

fn grant_request() -> Vec<u8> {
    frame::encode(&wire::Request {
        body: Some(wire::request::Body::Grant(wire::GrantRequest {
            kind: wire::CredentialKind::SshUser as i32,
            role: "dev".into(),
            ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb2X0Yb+6Qf9V3Q2Hn0Bq7Z8yq6zG0cV7tJ0mYbPzqS".into(),
            principals: vec!["root".into()],
            ..Default::default()
        })),
    })
}

/// A client certificate for `cn` signed by `issuer`, valid in [from, to].
fn client_cert(
    cn: &str,
    issuer: &Issuer<'_, KeyPair>,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> (rustls::pki_types::CertificateDer<'static>, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = from;
    p.not_after = to;
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.der().clone(), key.serialize_pem())
}

#[test]
fn unenrolled_client_gets_unauthenticated() {
    let broker = Broker::start();
    let ca = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    runtime().block_on(async {
        let conn = connect(&broker.addr, client_config(&ca, None)).await.unwrap();
        let resp = send_raw(&conn, &grant_request()).await.unwrap();
        let (code, msg) = error_of(&resp);
        assert_eq!(code, wire::ErrorCode::Unauthenticated);
        assert!(msg.contains("enroll first"), "{msg}");
    });
}

#[test]
fn certificate_from_another_ca_is_refused_at_handshake() {
    let broker = Broker::start();
    let ca = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    let other_key = KeyPair::generate().unwrap();
    let mut other = CertificateParams::default();
    other.distinguished_name.push(DnType::CommonName, "Evil CA");
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_issuer = Issuer::new(other, other_key);
    let now = OffsetDateTime::now_utc();
    let (cert, key) = client_cert("web-1", &other_issuer, now - Duration::hours(1), now + Duration::hours(1));
    runtime().block_on(async {
        // The handshake itself fails, or the first request does (TLS 1.3 client
        // auth completes after the client's handshake returns).
        let outcome = match connect(&broker.addr, client_config(&ca, Some((vec![cert], key)))).await {
            Err(e) => e,
            Ok(conn) => send_raw(&conn, &grant_request()).await.expect_err("a foreign certificate was accepted"),
        };
        assert!(!outcome.is_empty());
    });
}

#[test]
fn expired_node_certificate_is_refused() {
    let broker = Broker::start();
    // Enroll a real node so the name is known, then present an expired
    // certificate for it, signed by the real node CA.
    let agent = Agent::start(&broker, "web-9");
    let agent_dir = agent.dir;
    let ca = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    let node_ca_key = KeyPair::from_pem(&std::fs::read_to_string(broker.path("node-ca.key")).unwrap()).unwrap();
    let node_ca_pem = std::fs::read_to_string(broker.path("node-ca.pem")).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&node_ca_pem, node_ca_key).unwrap();
    let now = OffsetDateTime::now_utc();
    let (cert, key) = client_cert("web-9", &issuer, now - Duration::hours(2), now - Duration::hours(1));
    runtime().block_on(async {
        let outcome = match connect(&broker.addr, client_config(&ca, Some((vec![cert], key)))).await {
            Err(e) => e,
            Ok(conn) => send_raw(&conn, &grant_request()).await.expect_err("an expired certificate was accepted"),
        };
        assert!(!outcome.is_empty());
    });
    // A valid certificate from that CA that the broker never issued is not
    // the node's identity either: only the serial recorded at enrollment (or
    // renewal) speaks for the node.
    let (cert, key) = client_cert("web-9", &issuer, now - Duration::hours(1), now + Duration::hours(1));
    runtime().block_on(async {
        let conn = connect(&broker.addr, client_config(&ca, Some((vec![cert], key)))).await.unwrap();
        let (code, msg) = grantline_tests::raw::refusal_of(&conn, &grant_request()).await;
        assert_eq!(code, wire::ErrorCode::Unauthenticated, "{msg}");
    });
    // And the node's own identity is served, so the refusals above were
    // about expiry and the serial.
    runtime().block_on(async {
        let identity = grantline_tests::raw::node_identity(agent_dir.path());
        let conn = connect(&broker.addr, client_config(&ca, Some(identity))).await.unwrap();
        let resp = send_raw(&conn, &grant_request()).await.unwrap();
        assert!(matches!(resp.body, Some(wire::response::Body::Grant(_))), "{resp:?}");
    });
}

#[test]
fn reused_and_expired_join_tokens_are_refused_and_audited() {
    let broker = Broker::start();
    let token = broker.join_token();
    // The token `grantlined dev` made at start is in the log like any other.
    let id = token.split('.').nth(1).unwrap().to_owned();
    assert!(
        broker.events().iter().any(|e| matches!(e, Event::TokenCreation { token_id, .. } if *token_id == id)),
        "the dev broker's join token was not audited"
    );
    let (_first, out) = Agent::enroll_with(&broker, &token, "n1");
    assert!(out.status.success(), "{}", stderr(&out));
    let (_second, out) = Agent::enroll_with(&broker, &token, "n2");
    assert_eq!(out.status.code(), Some(77));
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));

    // Expire a token by moving its expiry into the past, as time would.
    let expired = broker.new_token(&[]);
    let id = expired.split('.').nth(1).unwrap();
    let db = rusqlite::Connection::open(broker.path("state.db")).unwrap();
    assert_eq!(db.execute("UPDATE join_tokens SET expires_at = 1 WHERE id = ?1", [id]).unwrap(), 1);
    let (_third, out) = Agent::enroll_with(&broker, &expired, "n3");
    assert_eq!(out.status.code(), Some(77));
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));

    let (_fourth, out) = Agent::enroll_with(&broker, "glt1.0123456789abcdef.nope", "n4");
    assert_eq!(out.status.code(), Some(77));
    assert!(stderr(&out).contains("unknown"), "{}", stderr(&out));

    let denials: Vec<String> = broker
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Denial { action, reason, .. } if action == "enroll" => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(denials.len(), 3, "{denials:?}");
    // The token's secret never reaches the log.
    let secret = token.rsplit('.').next().unwrap();
    let raw = std::fs::read(broker.path("audit.db")).unwrap();
    assert!(!raw.windows(secret.len()).any(|w| w == secret.as_bytes()));
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}
