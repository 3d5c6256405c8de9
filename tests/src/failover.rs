//! A fleet's failover under load (RFD 0010): fixture agents enrolled through
//! the real join-token path, spread over the fleet's brokers; one broker is
//! killed and every agent it held notices (its idle timeout, as a real
//! agent given several brokers), moves to another broker with the agent's
//! full-jitter backoff, and is granted there. Every grant acknowledged is
//! returned, so that the caller can find each in the brokers' logs.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grantline_proto::admin::admin_client::AdminClient;
use grantline_proto::admin::CreateJoinTokenRequest;
use grantline_proto::{frame, wire};
use serde_json::{json, Value};
use sha2::Digest;

use crate::load::{grant_once, grant_request, report, runtime, Fixture, Fleet, FleetLoad, Tally};

async fn admin_client(socket: &Path) -> AdminClient<tonic::transport::Channel> {
    let target = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://grantlined.admin")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let target = target.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(target).await?))
            }
        }))
        .await
        .unwrap();
    AdminClient::new(channel)
}

/// Enrollments at once, each from a loopback address of its own.
const SOURCES: usize = 32;

/// Enrolls `count` nodes named `{prefix}{i}` at `broker`, each with a token
/// made over `admin_socket` and a real enrollment, all for one key; writes
/// the fixture to `out`.
pub fn enroll_fixture(
    admin_socket: &Path,
    broker: &str,
    ca_pem: &str,
    prefix: &str,
    count: usize,
    out: &Path,
) -> Value {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = Arc::new(params.serialize_request(&key).unwrap().der().to_vec());
    let start = Instant::now();
    let leaves = runtime().block_on(async {
        let admin = admin_client(admin_socket).await;
        // Nodes are many hosts: each enrollment comes from a loopback address
        // of its own kind (127.0.0.2 …), as the broker admits only a few
        // connections without an identity per address.
        let slots = Arc::new(tokio::sync::Semaphore::new(SOURCES));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..count {
            let (mut admin, slots, csr) = (admin.clone(), slots.clone(), csr.clone());
            let (name, broker, ca_pem) = (format!("{prefix}{i}"), broker.to_owned(), ca_pem.to_owned());
            tasks.spawn(async move {
                let _slot = slots.acquire().await.unwrap();
                let asked = CreateJoinTokenRequest { node_name: name.clone(), ..Default::default() };
                let token = admin.create_join_token(asked).await.unwrap().into_inner().token;
                let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + u8::try_from(i % SOURCES).unwrap());
                let ep = quinn::Endpoint::client((source, 0).into()).unwrap();
                let conn = ep
                    .connect_with(crate::raw::client_config(&ca_pem, None), broker.parse().unwrap(), "127.0.0.1")
                    .unwrap()
                    .await
                    .unwrap_or_else(|e| panic!("enrolling {name}: {e}"));
                let request = frame::encode(&wire::Request {
                    body: Some(wire::request::Body::Enroll(wire::EnrollRequest {
                        token,
                        csr_der: csr.to_vec(),
                        node_name: name.clone(),
                    })),
                });
                let leaf = match crate::raw::send_raw(&conn, &request).await {
                    Ok(wire::Response { body: Some(wire::response::Body::Enroll(r)) }) => {
                        r.identity.and_then(|id| id.chain_der.into_iter().next()).expect("an identity")
                    }
                    other => panic!("enrolling {name}: {other:?}"),
                };
                conn.close(0u32.into(), b"enrolled");
                (i, name, leaf)
            });
        }
        let mut leaves = vec![(String::new(), Vec::new()); count];
        while let Some(done) = tasks.join_next().await {
            let (i, name, leaf) = done.unwrap();
            leaves[i] = (name, leaf);
        }
        leaves
    });
    Fixture { key_pem: key.serialize_pem(), nodes: leaves }.write(out).unwrap();
    json!({"scenario": "enroll", "nodes": count, "seconds": start.elapsed().as_secs_f64()})
}

/// One grant over `conn`; its leaf's fingerprint (SHA-256 of the DER, as
/// the audit log records it) when granted.
async fn grant_acked(conn: &quinn::Connection, request: &[u8], tally: &Mutex<Tally>) -> Option<String> {
    let g = grant_once(conn, request, tally).await?;
    let der = rustls_pemfile::certs(&mut g.cert_pem.as_bytes()).next()?.ok()?;
    Some(hex::encode(sha2::Sha256::digest(&der)))
}

/// Connects every agent (agent `i` at broker `i % brokers`), grants once
/// to each, calls `kill` (which must stop broker 0 without a word, as
/// SIGKILL does), then moves each of broker 0's agents to the others as an
/// agent does and grants once more; the report, and the fingerprint of
/// every grant acknowledged.
pub fn failover(f: &FleetLoad, limit: Duration, kill: impl FnOnce()) -> (Value, Vec<String>) {
    let request = Arc::new(grant_request(&f.role, &f.san));
    runtime().block_on(async move {
        let fleet = Arc::new(Fleet::new(f));
        let brokers = fleet.addrs.len();
        assert!(brokers > 1, "a failover needs at least two brokers");
        let (by_agent, connect) = fleet.connect_all().await;
        let acked = Arc::new(Mutex::new(Vec::new()));
        let before = Arc::new(Mutex::new(Tally::default()));
        let slots = Arc::new(tokio::sync::Semaphore::new(512));
        let mut grants = tokio::task::JoinSet::new();
        for c in by_agent.iter().flatten() {
            let (c, request, before, acked, slots) =
                (c.clone(), request.clone(), before.clone(), acked.clone(), slots.clone());
            grants.spawn(async move {
                let _slot = slots.acquire().await.unwrap();
                if let Some(fp) = grant_acked(&c, &request, &before).await {
                    acked.lock().unwrap().push(fp);
                }
            });
        }
        while grants.join_next().await.is_some() {}
        let held: Vec<(usize, quinn::Connection)> = by_agent
            .iter()
            .enumerate()
            .filter(|(i, _)| i % brokers == 0)
            .filter_map(|(i, c)| Some((i, c.clone()?)))
            .collect();
        kill();
        let killed_at = Instant::now();
        let detected = Arc::new(Mutex::new(Tally::default()));
        let after = Arc::new(Mutex::new(Tally::default()));
        let mut agents = tokio::task::JoinSet::new();
        for (i, conn) in held {
            let (fleet, request, detected, after, acked) =
                (fleet.clone(), request.clone(), detected.clone(), after.clone(), acked.clone());
            agents.spawn(async move {
                // The broker is gone without a close: the agent learns it
                // from the silence (its idle timeout).
                conn.closed().await;
                detected.lock().unwrap().latencies.push(killed_at.elapsed());
                let (mut attempt, mut retry_after) = (0u32, Duration::ZERO);
                while killed_at.elapsed() < limit {
                    let unit = rand::random::<f64>();
                    let wait = grantline_agent::connection::reconnect_wait(attempt, retry_after, Duration::ZERO, unit);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                    // The agent's next broker in its list, never the dead one.
                    let to = 1 + (i / brokers + attempt as usize) % (brokers - 1);
                    match fleet.dialer_at(i, to).dial().await {
                        Ok((conn, _)) => {
                            let got = Mutex::new(Tally::default());
                            if let Some(fp) = grant_acked(&conn, &request, &got).await {
                                acked.lock().unwrap().push(fp);
                                after.lock().unwrap().latencies.push(killed_at.elapsed());
                                return Some(conn);
                            }
                            let why = got.into_inner().unwrap().errors.into_keys().next().unwrap_or_default();
                            *after.lock().unwrap().retries.entry(format!("grant: {why}")).or_default() += 1;
                            retry_after = Duration::ZERO;
                        }
                        Err(e) => {
                            *after.lock().unwrap().retries.entry(e.what).or_default() += 1;
                            retry_after = e.retry_after;
                        }
                    }
                }
                *after.lock().unwrap().errors.entry("not re-granted within the limit".into()).or_default() += 1;
                None
            });
        }
        let mut moved = Vec::new();
        while let Some(done) = agents.join_next().await {
            moved.extend(done.unwrap());
        }
        let failover_seconds = killed_at.elapsed().as_secs_f64();
        fleet.close(&moved).await;
        let survivors: Vec<quinn::Connection> =
            by_agent.iter().enumerate().filter(|(i, _)| i % brokers != 0).filter_map(|(_, c)| c.clone()).collect();
        fleet.close(&survivors).await;
        let (before, detected, after) = (before.lock().unwrap(), detected.lock().unwrap(), after.lock().unwrap());
        let on_killed = detected.latencies.len();
        let out = json!({
            "scenario": "failover",
            "agents": fleet.leaves.len(),
            "brokers": brokers,
            "connect": connect,
            "granted_before": before.latencies.len(),
            "errors_before": before.errors,
            "on_killed_broker": on_killed,
            "detected_ms": report("detected", on_killed, killed_at.elapsed(), &detected, json!({}))["latency_ms"],
            "regranted": after.latencies.len(),
            "regranted_ms": report("regranted", on_killed, killed_at.elapsed(), &after, json!({}))["latency_ms"],
            "retries_after": after.retries,
            "errors_after": after.errors,
            "failover_seconds": failover_seconds,
        });
        let acked = acked.lock().unwrap().clone();
        (out, acked)
    })
}

/// `agents` load-generator agents enrolled at `fleet` and spread over its
/// brokers; broker 0 killed with SIGKILL; the [`failover`] report, with the
/// enrollment's, how many grants were acknowledged, and how many of those
/// no broker's log holds (`lost`, which must be 0).
pub fn kill_one_of(fleet: &mut crate::fleet::Fleet, agents: usize) -> Value {
    let fixture = fleet.root.path().join("fixture");
    let first = &fleet.brokers[0];
    let ca_pem = std::fs::read_to_string(first.path("ca.pem")).unwrap();
    let enrolled = enroll_fixture(&first.admin_socket(), &first.addr, &ca_pem, "fo-", agents, &fixture);
    let load = FleetLoad {
        broker: fleet.addresses(),
        ca_pem,
        fixture,
        agents,
        endpoints: 8,
        connect_concurrency: 64,
        role: "dev".into(),
        san: "failover.example.com".into(),
        broker_pid: None,
        resumption: false,
    };
    let victim = &mut fleet.brokers[0];
    let (mut report, acked) = failover(&load, Duration::from_secs(120), || victim.proc.kill9());
    let mut logged = std::collections::HashSet::new();
    for b in &fleet.brokers {
        for e in crate::events(&b.path("audit.db")) {
            if let grantline_proto::audit::Event::Grant { fingerprint, .. } = e {
                logged.insert(fingerprint);
            }
        }
    }
    report["enroll"] = enrolled;
    report["acknowledged"] = acked.len().into();
    report["lost"] = acked.iter().filter(|fp| !logged.contains(*fp)).count().into();
    report
}
