//! The attacker is an enrolled node (or holds a node's key): it sends what
//! its own agent never would. RFD 0009 lists what it cannot do; each test
//! here shows one of those rows.

#![allow(clippy::unwrap_used)]

use grantline_proto::{frame, wire};
use grantline_tests::raw::{client_config, connect, error_of, node_identity, runtime, send_raw};
use grantline_tests::{stderr, Agent, Broker};

fn request(body: wire::request::Body) -> Vec<u8> {
    frame::encode(&wire::Request { body: Some(body) })
}

fn renewal() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap();
    request(wire::request::Body::RenewIdentity(wire::RenewIdentityRequest { csr_der: csr.der().to_vec() }))
}

fn nodes(broker: &Broker) -> serde_json::Value {
    let out = broker.admin(&["nodes", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Review defect 2: a request whose fields are huge was quoted whole in its
/// denial, making an entry the verifier rejects and the broker cannot start
/// after. Now the entry is bounded, the log verifies and the broker restarts.
#[test]
fn a_huge_request_cannot_poison_the_log() {
    let mut broker = Broker::start();
    let agent = Agent::start(&broker, "big");
    let ca = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    let identity = node_identity(agent.dir.path());
    runtime().block_on(async {
        let conn = connect(&broker.addr, client_config(&ca, Some(identity))).await.unwrap();
        for (role, san) in [("r".repeat(40_000), "a".to_owned()), ("dev".to_owned(), "é".repeat(30_000))] {
            let grant = request(wire::request::Body::Grant(wire::GrantRequest {
                kind: wire::CredentialKind::SshUser as i32,
                role,
                ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb2X0Yb+6Qf9V3Q2Hn0Bq7Z8yq6zG0cV7tJ0mYbPzqS"
                    .into(),
                principals: vec![san],
                ..Default::default()
            }));
            let (code, msg) = error_of(&send_raw(&conn, &grant).await.unwrap());
            assert_ne!(code, wire::ErrorCode::Unavailable, "{msg}");
            assert!(msg.len() < 4096, "the reply quotes the input whole: {} bytes", msg.len());
        }
    });
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    broker.proc.wait();
    broker.restart();
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["ssh", "--role", "dev", "--principal", "big", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "the broker serves after the restart: {}", stderr(&got));
    assert!(broker.verify().0);
}

/// Review defect 3: renewals in flight while the node was revoked put it
/// back in the broker's table as not revoked. Revocation is monotonic: once
/// `nodes revoke` returns, the node stays revoked, whatever was in flight.
#[test]
fn renewals_in_flight_cannot_undo_a_revocation() {
    let broker = Broker::start();
    let agent = Agent::start(&broker, "racer");
    let ca = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    let identity = node_identity(agent.dir.path());
    // Keep renewals in flight on the node's own connection until it is
    // closed; each one that comes back is reported on `renewed`.
    let (renewed_tx, renewed) = std::sync::mpsc::channel::<()>();
    let flood = {
        let (addr, ca, identity) = (broker.addr.clone(), ca.clone(), identity.clone());
        std::thread::spawn(move || {
            runtime().block_on(async move {
                let conn = connect(&addr, client_config(&ca, Some(identity))).await.unwrap();
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..8 {
                    let (conn, renewed_tx) = (conn.clone(), renewed_tx.clone());
                    tasks.spawn(async move {
                        while let Ok(resp) = send_raw(&conn, &renewal()).await {
                            if !matches!(resp.body, Some(wire::response::Body::RenewIdentity(_))) {
                                eprintln!("renewal answered with {resp:?}");
                                break;
                            }
                            let _ = renewed_tx.send(());
                        }
                    });
                }
                while tasks.join_next().await.is_some() {}
            })
        })
    };
    // Revoke once renewals are flowing, so that some are in flight.
    for _ in 0..20 {
        renewed.recv().unwrap();
    }
    let revoke = broker.admin(&["nodes", "revoke", "racer", "--reason", "stolen"]);
    assert!(revoke.status.success(), "{}", stderr(&revoke));
    flood.join().unwrap();
    let after = renewed.try_iter().count();
    eprintln!("{after} more renewals were answered around the revocation");

    let listed = nodes(&broker);
    let racer = listed.as_array().unwrap().iter().find(|n| n["name"] == "racer").unwrap();
    assert_eq!(racer["revoked"], true, "the node came back from its revocation: {racer}");
    // Neither the old identity nor any renewed one is served.
    runtime().block_on(async {
        if let Ok(conn) = connect(&broker.addr, client_config(&ca, Some(identity))).await {
            let (code, msg) = grantline_tests::raw::refusal_of(&conn, &renewal()).await;
            assert_eq!(code, wire::ErrorCode::Revoked, "{msg}");
        }
    });
}

/// Review defect 5: a token that pins no name enrolled a second identity
/// under the name of a healthy, enrolled node and both kept working. An
/// unpinned token cannot take an enrolled name (and is not spent trying); a
/// re-enrollment with a pinned token shuts the old identity out.
#[test]
fn an_unpinned_token_cannot_take_over_an_enrolled_name() {
    let broker = Broker::start();
    let web = Agent::start(&broker, "web-1");
    let token = broker.new_token(&[]);
    let (_, out) = Agent::enroll_with(&broker, &token, "web-1");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already enrolled"), "{}", stderr(&out));
    // The refused attempt did not spend the token.
    let (_, out) = Agent::enroll_with(&broker, &token, "web-2");
    assert!(out.status.success(), "{}", stderr(&out));

    // A token pinned to the name re-enrolls it; the old identity is out.
    let pinned = broker.new_token(&["--node", "web-1"]);
    let (_, out) = Agent::enroll_with(&broker, &pinned, "web-1");
    assert!(out.status.success(), "{}", stderr(&out));
    let ca = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    runtime().block_on(async {
        let conn = connect(&broker.addr, client_config(&ca, Some(node_identity(web.dir.path())))).await.unwrap();
        let (code, msg) = grantline_tests::raw::refusal_of(&conn, &renewal()).await;
        assert_eq!(code, wire::ErrorCode::Unauthenticated, "{msg}");
        assert!(msg.contains("was replaced"), "{msg}");
    });
}

/// The follow-up review: after a renewal S1 -> S2, a leaked copy of S1
/// renewed again from S1 (the previous serial), took the node over and shut
/// the real agent's S2 out. Once S2 has been used, S1 renews nothing.
#[test]
fn a_replaced_identity_cannot_renew_once_its_successor_is_in_use() {
    let broker = Broker::start();
    let agent = Agent::start(&broker, "renewer");
    let s1 = node_identity(agent.dir.path());
    let ca = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    runtime().block_on(async {
        // The node renews S1 -> S2 (here by hand, keeping S2's key).
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec();
        let req = request(wire::request::Body::RenewIdentity(wire::RenewIdentityRequest { csr_der: csr }));
        let old = connect(&broker.addr, client_config(&ca, Some(s1.clone()))).await.unwrap();
        let resp = send_raw(&old, &req).await.unwrap();
        let Some(wire::response::Body::RenewIdentity(r)) = resp.body else { panic!("{resp:?}") };
        let chain = r.identity.unwrap().chain_der.into_iter().map(rustls::pki_types::CertificateDer::from).collect();
        // S2 is used: a connection authenticates with it and is served.
        let new = connect(&broker.addr, client_config(&ca, Some((chain, key.serialize_pem())))).await.unwrap();
        let (code, _) = error_of(&send_raw(&new, &frame::encode(&wire::Request { body: None })).await.unwrap());
        assert_eq!(code, wire::ErrorCode::BadRequest, "S2 is served (an empty request is a bad request)");
        // The leaked S1 can no longer renew.
        let (code, msg) = grantline_tests::raw::refusal_of(&old, &renewal()).await;
        assert_eq!(code, wire::ErrorCode::Unauthenticated, "{msg}");
    });
}

/// With an independent QUIC client (aioquic), the holder of a node's key
/// resumes the node's TLS session: the broker's tickets allow no 0-RTT data
/// (a request in it could be replayed by anyone who captured it, minting
/// twice), a resumed session's request waits for the handshake, and once the
/// node is revoked, resuming a session from before the revocation does not
/// bring it back: the connection is closed, the renewal never served.
#[test]
fn resumed_sessions_carry_no_0rtt_and_do_not_outlive_a_revocation() {
    use grantline_tests::quic_peer;
    let broker = Broker::start();
    let agent = Agent::start(&broker, "resumer");
    let (host, port) = quic_peer::host_port(&broker.addr);
    let ca = broker.path("ca.pem");
    let ticket = tempfile::tempdir().unwrap();
    let ticket = ticket.path().join("ticket");
    let state = agent.dir.path();
    let args = |mode: &'static str, payload: String| {
        [
            mode.to_owned(),
            host.clone(),
            port.clone(),
            ca.display().to_string(),
            state.join("node.pem").display().to_string(),
            state.join("node.key").display().to_string(),
            ticket.display().to_string(),
            payload,
        ]
    };
    let run = |a: [String; 8]| quic_peer::run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let empty = hex::encode(frame::encode(&wire::Request { body: None }));
    let answered = |v: &serde_json::Value| {
        let reply = hex::decode(v["reply"].as_str().unwrap_or_default()).unwrap();
        !reply.is_empty() && frame::decode::<wire::Response>(&reply).is_ok()
    };

    let first = run(args("ticket", empty.clone()));
    assert!(answered(&first), "{first}");
    assert!(first["max_early_data_size"].as_u64().unwrap_or(0) == 0, "the ticket allows 0-RTT: {first}");
    let resumed = run(args("resume", empty));
    assert_eq!(resumed["resumed"], true, "{resumed}");
    assert_eq!(resumed["early_data_accepted"], false, "{resumed}");
    assert!(answered(&resumed), "a resumed session's request was not served: {resumed}");

    let revoke = broker.admin(&["nodes", "revoke", "resumer", "--reason", "key stolen"]);
    assert!(revoke.status.success(), "{}", stderr(&revoke));
    let after = run(args("resume", hex::encode(renewal())));
    assert!(!answered(&after), "a revoked node's resumed session was served: {after}");
    let reason = after["closed"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("has been revoked"), "{after}");
    let renewals = broker
        .events()
        .into_iter()
        .filter(|e| matches!(e, grantline_proto::audit::Event::IdentityRenewal { .. }))
        .count();
    assert_eq!(renewals, 0, "a renewal was served to a revoked node");
}

/// A node (or the holder of its key) holds at most 8 connections: each costs
/// the broker memory, and one node must not crowd out the others. The ones
/// past the limit are closed with the reason; those within it are served.
#[test]
fn a_node_cannot_hold_more_than_eight_connections() {
    let broker = Broker::start();
    let agent = Agent::start(&broker, "hoarder");
    let ca = std::fs::read_to_string(broker.path("ca.pem")).unwrap();
    let identity = node_identity(agent.dir.path());
    let empty = frame::encode(&wire::Request { body: None });
    runtime().block_on(async {
        let mut conns = Vec::new();
        for _ in 0..12 {
            conns.push(connect(&broker.addr, client_config(&ca, Some(identity.clone()))).await.unwrap());
        }
        let (mut served, mut refused) = (0, 0);
        for conn in &conns {
            let (code, msg) = grantline_tests::raw::refusal_of(conn, &empty).await;
            if msg.contains("already holds 8 connections") {
                refused += 1;
            } else {
                assert_eq!(code, wire::ErrorCode::BadRequest, "{msg}");
                served += 1;
            }
        }
        // The agent holds one of the eight itself.
        assert!(served <= 8 && refused >= 4, "{served} served, {refused} refused");
        drop(conns);
    });
    // The node's own agent is not the one shut out.
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["x509", "--role", "dev", "--san", "a.example.com", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
}

/// An agent whose identity no longer speaks for its node (the name was
/// enrolled again, say on a rebuilt host, and the old one started) was
/// closed at once by the broker and reconnected about ten times a second,
/// forever: a full handshake each time. Now it says it is shut out and backs
/// off to its 30 s cap; only a connection that lasted resets the backoff.
#[test]
fn a_shut_out_identity_does_not_reconnect_in_a_loop() {
    let broker = Broker::start();
    let mut old = Agent::start(&broker, "twin");
    old.proc = None; // stopped, as a host is before its rebuild
    let token = broker.new_token(&["--node", "twin"]);
    let (_new, out) = Agent::enroll_with(&broker, &token, "twin");
    assert!(out.status.success(), "{}", stderr(&out));
    let mut old = Agent::run_with(old, &[]);
    let lines = old.proc.as_mut().unwrap().lines_for(std::time::Duration::from_secs(5));
    let reconnects = lines.iter().filter(|l| l.starts_with("grantline-agent connected")).count();
    assert!(reconnects <= 2, "{reconnects} reconnections in 5 s by an identity the broker shuts out");
    assert!(
        lines.iter().any(|l| l.starts_with("grantline-agent shut out:") && l.contains("twin")),
        "the agent did not say it is shut out: {lines:?}"
    );
}
