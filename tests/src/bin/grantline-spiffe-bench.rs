//! Measures the SPIFFE socket (RFD 0011) through the Rust `spiffe` crate's
//! Workload API client, against a real broker and agent: X509-SVIDs served
//! per second (the agent's cached SVID, one stream per fetch), JWT-SVIDs
//! minted per second (a new audience each, so every one is signed by the
//! broker and audited before it is handed out), and the time from a
//! rotation's audit entry at the broker to the client's stream update.
//!
//! usage: grantline-spiffe-bench [SECONDS] [CLIENTS] [ROTATIONS]  (default 10 8 3)
//! Prints one JSON object.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use grantline_proto::audit::{Entry, Event};
use grantline_tests::spiffe::Node;

const POLICY: &str = r#"
[[rule]]
name = "bench"
[[rule.allow]]
kinds = ["x509-svid", "jwt-svid"]
roles = ["spiffe"]
max_ttl = "20s"
default_ttl = "20s"
uids = [{uid}]
exe = ["*/grantline-spiffe-bench"]
spiffe_ids = ["spiffe://{trust_domain}/bench"]
audiences = ["https://*.example.org"]
"#;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

async fn client(endpoint: &str) -> spiffe::WorkloadApiClient {
    spiffe::WorkloadApiClient::connect_to(endpoint).await.expect("connect to the SPIFFE socket")
}

/// Runs `clients` tasks for `seconds`, each calling `call(task, n)` in a loop;
/// calls per second and latency percentiles (ms).
async fn phase<F, Fut>(seconds: u64, clients: u64, call: F) -> serde_json::Value
where
    F: Fn(spiffe::WorkloadApiClient, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = (spiffe::WorkloadApiClient, Result<(), String>)> + Send,
{
    let (ok, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // Errors counted by their message, to say what went wrong.
    let kinds = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let end = Instant::now() + Duration::from_secs(seconds);
    let endpoint = std::env::var("SPIFFE_ENDPOINT_SOCKET").unwrap_or_default();
    let mut tasks = Vec::new();
    for task in 0..clients {
        let (call, ok, errors, endpoint, kinds) =
            (call.clone(), ok.clone(), errors.clone(), endpoint.clone(), kinds.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = client(&endpoint).await;
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < end {
                let start = Instant::now();
                let (back, good) = call(c, task * 1_000_000 + n).await;
                c = back;
                latencies.push(start.elapsed().as_secs_f64() * 1000.0);
                match good {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        *kinds.lock().unwrap().entry(e.chars().take(160).collect()).or_default() += 1;
                        errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
                n += 1;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all.sort_by(f64::total_cmp);
    #[allow(clippy::cast_precision_loss)]
    let rate = ok.load(Ordering::Relaxed) as f64 / seconds as f64;
    serde_json::json!({
        "per_second": (rate * 10.0).round() / 10.0,
        "ok": ok.load(Ordering::Relaxed),
        "errors": errors.load(Ordering::Relaxed),
        "error_kinds": *kinds.lock().unwrap(),
        "p50_ms": (percentile(&all, 0.5) * 100.0).round() / 100.0,
        "p99_ms": (percentile(&all, 0.99) * 100.0).round() / 100.0,
    })
}

fn unix_ms() -> i64 {
    let d = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// When each X509-SVID serial was audited (entry time, ms).
fn audited_at(db: &std::path::Path) -> Vec<(String, i64)> {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut stmt = conn.prepare("SELECT entry FROM entries ORDER BY seq").unwrap();
    let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap();
    rows.filter_map(|r| {
        let bytes = r.ok()?;
        let entry = Entry::decode(&bytes).ok()?;
        match entry.event().ok()? {
            Event::Grant { kind, serial, .. } if kind == "x509-svid" => Some((serial, entry.time_ms)),
            _ => None,
        }
    })
    .collect()
}

#[tokio::main]
async fn main() {
    rustls::crypto::aws_lc_rs::default_provider().install_default().ok();
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (seconds, clients, rotations) =
        (args.first().copied().unwrap_or(10), args.get(1).copied().unwrap_or(8), args.get(2).copied().unwrap_or(3));
    let node = tokio::task::spawn_blocking(|| {
        let policy = POLICY.replace("{uid}", &nix::unistd::getuid().as_raw().to_string());
        // The bench measures the broker, not the agent's per-principal budget.
        Node::start_with(&policy, "[spiffe]\nbroker_requests_per_second = 1000000\n")
    })
    .await
    .unwrap();
    let endpoint = format!("unix:{}", node.socket().display());
    std::env::set_var("SPIFFE_ENDPOINT_SOCKET", &endpoint);
    let first = client(&endpoint).await.fetch_x509_svid().await.expect("the first X509-SVID");

    let x509 = phase(seconds, clients, |c, _| async move {
        let good = c.fetch_x509_svid().await.map(drop).map_err(|e| e.to_string());
        (c, good)
    })
    .await;
    let jwt = phase(seconds, clients, |c, n| async move {
        let aud = format!("https://b{n}.example.org");
        let good = c.fetch_jwt_token(&[aud.as_str()], None).await.map(drop).map_err(|e| e.to_string());
        (c, good)
    })
    .await;

    // Rotations: each update the stream pushes, against its audit entry.
    let stream_client = client(&endpoint).await;
    let mut stream = stream_client.stream_x509_svids().await.expect("a stream");
    let mut seen = Vec::new();
    let mut last = hex::encode(first.leaf().as_ref());
    let deadline = Instant::now() + Duration::from_secs(30 * (rotations + 1));
    while seen.len() < usize::try_from(rotations).unwrap_or(usize::MAX) && Instant::now() < deadline {
        let Ok(Some(Ok(svid))) =
            tokio::time::timeout(Duration::from_secs(30), tokio_stream::StreamExt::next(&mut stream)).await
        else {
            break;
        };
        let leaf = hex::encode(svid.leaf().as_ref());
        if leaf != last {
            let (_, cert) = x509_parser::parse_x509_certificate(svid.leaf().as_ref()).unwrap();
            seen.push((hex::encode(cert.raw_serial()), unix_ms()));
            last = leaf;
        }
    }
    let audited = audited_at(&node.broker.path("audit.db"));
    let mut delays: Vec<f64> = seen
        .iter()
        .filter_map(|(serial, at)| {
            let (_, t) = audited.iter().find(|(s, _)| s.trim_start_matches('0') == serial.trim_start_matches('0'))?;
            #[allow(clippy::cast_precision_loss)]
            Some((at - t) as f64)
        })
        .collect();
    delays.sort_by(f64::total_cmp);
    let (ok, report) = node.broker.verify();
    let out = serde_json::json!({
        "seconds": seconds,
        "clients": clients,
        "x509_svids_served": x509,
        "jwt_svids_minted_and_audited": jwt,
        "rotation_audit_to_stream_ms": {
            "rotations": seen.len(),
            "matched": delays.len(),
            "p50": percentile(&delays, 0.5),
            "max": delays.last().copied().unwrap_or(0.0),
        },
        "svid_ttl_s": 20,
        "log_verifies": ok,
        "log_entries": report["entries"],
    });
    println!("{out}");
}
