//! Load against a broker (grant requests over real QUIC, as an enrolled node)
//! or straight at OpenBao's `pki/sign`, reported as one JSON object each:
//! requests, successes, errors by kind, rate, latency percentiles.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grantline_proto::{frame, wire};
use serde_json::{json, Value};

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, usize>,
}

fn report(scenario: &str, requests: usize, elapsed: Duration, tally: &Tally, extra: Value) -> Value {
    let mut l = tally.latencies.clone();
    l.sort();
    let pct = |p: f64| -> f64 {
        if l.is_empty() {
            return 0.0;
        }
        // The rank is at most l.len(), far inside usize.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
        l[i].as_secs_f64() * 1000.0
    };
    let ok = l.len();
    let mut out = json!({
        "scenario": scenario,
        "requests": requests,
        "ok": ok,
        "errors": tally.errors,
        "seconds": elapsed.as_secs_f64(),
        "per_second": ok as f64 / elapsed.as_secs_f64(),
        "latency_ms": { "p50": pct(0.50), "p99": pct(0.99), "p999": pct(0.999) },
    });
    if let (Some(o), Some(e)) = (out.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    out
}

/// A CSR for a fresh key naming `san` (as SAN and CN).
pub fn csr(san: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![san.to_owned()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, san);
    p.serialize_request(&key).unwrap().der().to_vec()
}

pub struct BrokerLoad {
    pub broker: String,
    pub ca_pem: String,
    /// An enrolled agent's state directory: its node.pem and node.key are used.
    pub identity_dir: PathBuf,
    pub role: String,
    pub san: String,
    pub connections: usize,
    pub concurrency: usize,
    pub requests: usize,
}

/// X.509 grants as fast as `concurrency` streams over `connections` allow.
pub fn broker_grants(o: &BrokerLoad, scenario: &str) -> Value {
    let chain_pem = std::fs::read_to_string(o.identity_dir.join("node.pem")).unwrap();
    let chain: Vec<_> = rustls_pemfile::certs(&mut chain_pem.as_bytes()).map(Result::unwrap).collect();
    let key = std::fs::read_to_string(o.identity_dir.join("node.key")).unwrap();
    let request = Arc::new(frame::encode(&wire::Request {
        body: Some(wire::request::Body::Grant(wire::GrantRequest {
            kind: wire::CredentialKind::X509 as i32,
            role: o.role.clone(),
            csr_der: csr(&o.san),
            sans: vec![o.san.clone()],
            ttl_seconds: 600,
            ..Default::default()
        })),
    }));
    let requests = o.requests;
    crate::raw::runtime().block_on(async move {
        let mut conns = Vec::new();
        for _ in 0..o.connections {
            let cfg = crate::raw::client_config(&o.ca_pem, Some((chain.clone(), key.clone())));
            conns.push(crate::raw::connect(&o.broker, cfg).await.unwrap());
        }
        let next = Arc::new(AtomicUsize::new(0));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..o.concurrency {
            let conn = conns[w % conns.len()].clone();
            let (next, tally, request) = (next.clone(), tally.clone(), request.clone());
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < requests {
                    let t = Instant::now();
                    let outcome = crate::raw::send_raw(&conn, &request).await;
                    let mut tally = tally.lock().unwrap();
                    match outcome {
                        Ok(wire::Response { body: Some(wire::response::Body::Grant(_)) }) => {
                            tally.latencies.push(t.elapsed())
                        }
                        Ok(wire::Response { body: Some(wire::response::Body::Error(e)) }) => {
                            let code = wire::ErrorCode::try_from(e.code).unwrap_or_default();
                            *tally.errors.entry(format!("{code:?}")).or_default() += 1;
                        }
                        Ok(_) => *tally.errors.entry("unexpected".into()).or_default() += 1,
                        Err(e) => *tally.errors.entry(format!("transport: {e}")).or_default() += 1,
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = start.elapsed();
        let tally = tally.lock().unwrap();
        report(scenario, requests, elapsed, &tally, json!({"connections": o.connections, "concurrency": o.concurrency}))
    })
}

pub struct VaultLoad {
    pub vault: String,
    pub token: String,
    pub role: String,
    pub san: String,
    pub concurrency: usize,
    pub requests: usize,
}

/// `pki/sign/:role` straight at OpenBao, `concurrency` clients at once.
pub fn vault_pki(o: &VaultLoad) -> Value {
    let body = json!({"csr": grantline_proto::pem::encode("CERTIFICATE REQUEST", &csr(&o.san)), "common_name": o.san, "ttl": "600s"});
    let url = format!("{}/v1/pki/sign/{}", o.vault, o.role);
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..o.concurrency {
            let (next, tally, body, url) = (next.clone(), tally.clone(), body.clone(), url.clone());
            s.spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                while next.fetch_add(1, Ordering::Relaxed) < o.requests {
                    let t = Instant::now();
                    let r = agent.post(&url).header("X-Vault-Token", &o.token).send_json(&body);
                    let mut tally = tally.lock().unwrap();
                    match r {
                        Ok(resp) if resp.status().is_success() => tally.latencies.push(t.elapsed()),
                        Ok(resp) => *tally.errors.entry(format!("http {}", resp.status().as_u16())).or_default() += 1,
                        Err(e) => *tally.errors.entry(format!("transport: {e}")).or_default() += 1,
                    }
                }
            });
        }
    });
    let tally = tally.lock().unwrap();
    report("openbao-pki-sign", o.requests, start.elapsed(), &tally, json!({"concurrency": o.concurrency}))
}
