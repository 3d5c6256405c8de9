//! The attacker is a network peer without a node certificate. RFD 0009
//! lists what it cannot do; these tests show the rows added by issue 12.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use grantline_proto::{frame, wire};
use grantline_tests::raw::{client_config, runtime, send_raw};
use grantline_tests::{stderr, Agent, Broker};

fn empty_request() -> Vec<u8> {
    frame::encode(&wire::Request { body: None })
}

/// Review defect 8: 500 certificate-less connections from one address, each
/// holding unfinished streams, stayed and cost ~230 KB each. Now an address
/// holds at most 8 such connections, each may carry one request within 10 s,
/// and then it is closed; enrollment keeps working for everyone else.
#[test]
fn certificate_less_connections_are_capped_and_short_lived() {
    let broker = Broker::start();
    let ca = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    runtime().block_on(async {
        let addr: std::net::SocketAddr = broker.addr.parse().unwrap();
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut conns = Vec::new();
        for _ in 0..24 {
            let c = endpoint.connect_with(client_config(&ca, None), addr, "127.0.0.1").unwrap().await.unwrap();
            // A stream opened and left unfinished, as the review's attacker
            // did (the broker may already have closed the connection).
            let stream = match c.open_bi().await {
                Ok((mut send, _recv)) => send.write_all(&[0x01]).await.ok().map(|()| send),
                Err(_) => None,
            };
            conns.push((c, stream));
        }
        // Eight are admitted and the rest closed at once, saying why. Which
        // eight is the broker's order of finishing handshakes, not ours, so
        // every closing is awaited together and told apart by its reason.
        let opened = Instant::now();
        let mut closings = tokio::task::JoinSet::new();
        for (c, _) in &conns {
            let c = c.clone();
            closings.spawn(async move {
                let reason = tokio::time::timeout(Duration::from_secs(30), c.closed()).await.expect("left open");
                let refusal = match reason {
                    quinn::ConnectionError::ApplicationClosed(close) => {
                        <wire::Error as prost::Message>::decode(close.reason.as_ref())
                            .ok()
                            .filter(|e| e.message.contains("without a node identity"))
                    }
                    _ => None,
                };
                (refusal.is_some(), opened.elapsed())
            });
        }
        let (mut refused, mut idle) = (Vec::new(), Vec::new());
        while let Some(closed) = closings.join_next().await {
            let (was_refused, after) = closed.unwrap();
            if was_refused {
                refused.push(after)
            } else {
                idle.push(after)
            }
        }
        assert_eq!(refused.len(), 16, "refused {refused:?}, idle {idle:?}");
        assert!(refused.iter().all(|t| *t < Duration::from_secs(5)), "a refusal took {refused:?}");
        // The eight admitted are closed once their window passes.
        assert!(idle.iter().all(|t| *t < Duration::from_secs(25)), "an idle anonymous connection stayed: {idle:?}");
        eprintln!("idle anonymous connections closed {idle:?} after the last was opened");

        // One request per connection: the second stream is not served.
        let c = endpoint.connect_with(client_config(&ca, None), addr, "127.0.0.1").unwrap().await.unwrap();
        let first = send_raw(&c, &empty_request()).await.unwrap();
        assert!(matches!(first.body, Some(wire::response::Body::Error(_))));
        assert!(send_raw(&c, &empty_request()).await.is_err(), "a second request was served");
    });
    // And an agent still enrolls.
    let token = broker.new_token(&[]);
    let (_, out) = Agent::enroll_with(&broker, &token, "after-flood");
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The same rows through an independent QUIC implementation (aioquic), with
/// frames no Grantline client builds: a truncated varint length, a length
/// past the limit, a length that disagrees with the bytes, and protobuf
/// garbage. The first is answered with an error naming the fault, the
/// connection then closed with the reason; the broker serves agents after.
#[test]
fn an_independent_quic_client_sending_malformed_frames_gets_errors_and_nothing_else() {
    use grantline_tests::quic_peer;
    let broker = Broker::start();
    let (host, port) = quic_peer::host_port(&broker.addr);
    let ca = broker.path("ca.pem").display().to_string();
    let cases: [(&str, &str); 4] = [
        ("ff", "bad length prefix"),
        ("ffff0f", "frame too large"),
        ("0a0102", "declares 10 bytes but 2 follow"),
        ("03ffffff", "not a valid Request"),
    ];
    for (frame_hex, says) in cases {
        let v = quic_peer::run(&["frames", &host, &port, &ca, frame_hex, "00"]);
        let reply = hex::decode(v["exchanges"][0]["reply"].as_str().unwrap_or_default()).unwrap();
        let reply: wire::Response = frame::decode(&reply).unwrap_or_else(|e| panic!("{frame_hex}: {e}: {v}"));
        let Some(wire::response::Body::Error(e)) = reply.body else { panic!("{frame_hex}: not an error: {v}") };
        assert!(e.message.contains(says), "{frame_hex}: {:?} should say {says:?}", e.message);
        // The second request on the connection is not served.
        let second = v["exchanges"][1]["reply"].as_str().unwrap_or_default();
        assert!(second.is_empty(), "{frame_hex}: a second request was served: {v}");
        let closed = v["closed"]["reason"].as_str().unwrap_or_default();
        assert!(closed.contains("one request per connection"), "{frame_hex}: {v}");
    }
    let agent = Agent::start(&broker, "after-garbage");
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["x509", "--role", "dev", "--san", "a.example.com", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
}
