//! Handshakes at scale (RFD 0008) against a real broker. Admission control:
//! past its limit the broker refuses handshakes with QUIC CONNECTION_REFUSED,
//! which agents read as "retry after a second"; past the retry threshold it
//! makes senders prove their address with a QUIC retry first (the slots are
//! held by handshakes that never finish: real client Initial packets, sent
//! from a socket that never answers). Session resumption: an agent resumes
//! its TLS session after a broker restart, and falls back to a full
//! handshake when the broker lost its ticket keys.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use grantline_tests::{metric, raw, scrape, stderr, Agent, Broker};

/// `n` distinct QUIC Initial packets of real client handshakes, captured on
/// a socket that plays the server and never answers.
fn client_initials(ca_pem: &str, n: usize) -> Vec<Vec<u8>> {
    raw::runtime().block_on(async {
        let sniffer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let cfg = raw::client_config(ca_pem, None);
        let _pending: Vec<_> =
            (0..n).map(|_| ep.connect_with(cfg.clone(), sniffer.local_addr().unwrap(), "127.0.0.1").unwrap()).collect();
        // By destination connection ID: a retransmission is not another handshake.
        let mut initials = BTreeMap::new();
        let mut buf = [0u8; 65_536];
        while initials.len() < n {
            let (len, _) = tokio::time::timeout(Duration::from_secs(10), sniffer.recv_from(&mut buf))
                .await
                .expect("the client sent no Initial packet")
                .unwrap();
            let d = &buf[..len];
            assert_eq!(d[0] & 0xf0, 0xc0, "not a long-header Initial packet");
            let dcid = d[6..6 + usize::from(d[5])].to_vec();
            initials.entry(dcid).or_insert_with(|| d.to_vec());
        }
        initials.into_values().collect()
    })
}

/// Starts `n` handshakes at the broker that will never finish; they hold
/// their slots until the broker's 10 s handshake timeout. Keep the socket.
fn stall_handshakes(broker: &Broker, n: usize) -> std::net::UdpSocket {
    let ca = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for initial in client_initials(&ca, n) {
        socket.send_to(&initial, &broker.addr).unwrap();
    }
    socket
}

/// Scrapes until `sample` has the value `want`, for up to 30 s.
fn wait_metric(metrics: &str, sample: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = scrape(metrics);
        if metric(&body, sample) == want {
            return body;
        }
        assert!(Instant::now() < deadline, "{sample} never reached {want}:\n{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One handshake with the broker, without a client certificate (as an
/// enrolling agent connects).
fn handshake(broker: &Broker) -> Result<quinn::Connection, quinn::ConnectionError> {
    let ca = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    let rt = raw::runtime();
    rt.block_on(async {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.connect_with(raw::client_config(&ca, None), broker.addr.parse().unwrap(), "127.0.0.1").unwrap().await
    })
}

const IN_FLIGHT: &str = "grantline_handshakes_in_flight";

/// A broker with these admission limits and `stalled` handshakes holding
/// slots (counted by the broker); its metrics URL and the stalling socket.
fn broker_with_stalled(max: &str, retry_above: &str, stalled: usize) -> (Broker, String, std::net::UdpSocket) {
    let mut broker = Broker::start_with(&[
        "--max-handshakes",
        max,
        "--retry-handshakes-above",
        retry_above,
        "--metrics",
        "127.0.0.1:0",
    ]);
    let metrics = broker.proc.wait_line("grantlined metrics on");
    let socket = stall_handshakes(&broker, stalled);
    #[allow(clippy::cast_precision_loss)]
    wait_metric(&metrics, IN_FLIGHT, stalled as f64);
    (broker, metrics, socket)
}

#[test]
fn past_its_handshake_limit_the_broker_refuses_with_a_retry_after_and_frees_slots_of_stalled_handshakes() {
    let (broker, metrics, _stalled) = broker_with_stalled("4", "100", 4);

    let refused = handshake(&broker).unwrap_err();
    assert_eq!(
        grantline_agent::connection::refused_retry_after(&refused),
        Some(grantline_proto::REFUSED_RETRY_AFTER),
        "not a refusal the agent would wait out: {refused}"
    );
    let body = scrape(&metrics);
    assert_eq!(metric(&body, "grantline_handshakes_total{outcome=\"refused\"}"), 1.0, "{body}");
    assert_eq!(metric(&body, "grantline_handshakes_total{outcome=\"accepted\"}"), 4.0, "{body}");

    // The stalled handshakes time out and give their slots back.
    let body = wait_metric(&metrics, IN_FLIGHT, 0.0);
    assert_eq!(metric(&body, "grantline_handshakes_total{outcome=\"timed_out\"}"), 4.0, "{body}");
    let conn = handshake(&broker).unwrap();
    conn.close(0u32.into(), b"done");
}

#[test]
fn past_the_retry_threshold_a_sender_proves_its_address_and_is_then_served() {
    let (broker, metrics, _stalled) = broker_with_stalled("100", "2", 2);

    let conn = handshake(&broker).unwrap();
    let body = scrape(&metrics);
    assert_eq!(metric(&body, "grantline_handshakes_total{outcome=\"retried\"}"), 1.0, "{body}");
    assert_eq!(metric(&body, "grantline_handshakes_total{outcome=\"accepted\"}"), 3.0, "{body}");
    assert_eq!(metric(&body, "grantline_handshakes_total{outcome=\"refused\"}"), 0.0, "{body}");
    conn.close(0u32.into(), b"done");
}

/// SIGTERM, `meanwhile`, and start again on the same address and state;
/// the new metrics URL.
fn restart(broker: &mut Broker, meanwhile: impl FnOnce(&Broker)) -> String {
    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(broker.proc.wait().success());
    meanwhile(broker);
    broker.restart_with(&["--metrics", "127.0.0.1:0"]);
    broker.proc.wait_line("grantlined metrics on")
}

fn granted(agent: &Agent) {
    let out = tempfile::tempdir().unwrap();
    let got =
        agent.get(&["x509", "--role", "dev", "--san", "web-1.example.com", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
}

const RESUMED: &str = "grantline_tls_resumptions_total";

#[test]
fn an_agent_resumes_its_tls_session_after_a_broker_restart_and_does_without_when_the_keys_are_gone() {
    let mut broker = Broker::start_with(&["--metrics", "127.0.0.1:0"]);
    let metrics = broker.proc.wait_line("grantlined metrics on");
    let mut agent = Agent::start(&broker, "web-1");
    granted(&agent);
    assert_eq!(metric(&scrape(&metrics), RESUMED), 0.0, "nothing to resume on a first connection");

    // The ticket the agent holds opens under the key saved in the state directory.
    let metrics = restart(&mut broker, |_| ());
    agent.wait_connected();
    assert_eq!(metric(&scrape(&metrics), RESUMED), 1.0);
    // The resumed session carries the node's identity.
    granted(&agent);

    // Without the saved keys the ticket is worthless: a full handshake.
    let metrics = restart(&mut broker, |b| std::fs::remove_file(b.path("tls-tickets.key")).unwrap());
    agent.wait_connected();
    assert_eq!(metric(&scrape(&metrics), RESUMED), 0.0);
    granted(&agent);
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}
