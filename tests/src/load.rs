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
pub(crate) struct Tally {
    pub(crate) latencies: Vec<Duration>,
    pub(crate) errors: BTreeMap<String, usize>,
    /// Attempts that failed but were tried again (storm reconnects).
    pub(crate) retries: BTreeMap<String, usize>,
}

pub(crate) fn report(scenario: &str, requests: usize, elapsed: Duration, tally: &Tally, extra: Value) -> Value {
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

/// One agent's way to the broker.
pub(crate) struct Dialer {
    ep: quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: std::net::SocketAddr,
}

impl Dialer {
    /// One handshake; the connection and how long the handshake took.
    pub(crate) async fn dial(&self) -> Result<(quinn::Connection, Duration), ConnectFailure> {
        let t = Instant::now();
        let connecting = self
            .ep
            .connect_with(self.cfg.clone(), self.addr, "127.0.0.1")
            .map_err(|e| ConnectFailure::other(format!("connect: {e}")))?;
        match tokio::time::timeout(Duration::from_secs(30), connecting).await {
            Ok(Ok(c)) => Ok((c, t.elapsed())),
            Ok(Err(e)) => Err(match grantline_agent::connection::refused_retry_after(&e) {
                Some(wait) => ConnectFailure { what: "handshake: refused".into(), retry_after: wait },
                None => ConnectFailure::other(format!("handshake: {e}")),
            }),
            Err(_) => Err(ConnectFailure::other(HANDSHAKE_TIMEOUT.into())),
        }
    }
}

const HANDSHAKE_TIMEOUT: &str = "handshake: timeout";

/// Why a load generator agent did not connect, and the wait the broker
/// asked for (a refused handshake, RFD 0008).
pub(crate) struct ConnectFailure {
    pub(crate) what: String,
    pub(crate) retry_after: Duration,
}

impl ConnectFailure {
    fn other(what: String) -> Self {
        Self { what, retry_after: Duration::ZERO }
    }
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
    /// The broker's pid, for its CPU time per grant.
    pub broker_pid: Option<u32>,
}

/// An encoded X.509 grant request for `role` naming `san`.
pub(crate) fn grant_request(role: &str, san: &str) -> Vec<u8> {
    frame::encode(&wire::Request {
        body: Some(wire::request::Body::Grant(wire::GrantRequest {
            kind: wire::CredentialKind::X509 as i32,
            role: role.to_owned(),
            csr_der: csr(san),
            sans: vec![san.to_owned()],
            ttl_seconds: 600,
            ..Default::default()
        })),
    })
}

/// X.509 grants as fast as `concurrency` streams over `connections` allow.
pub fn broker_grants(o: &BrokerLoad, scenario: &str) -> Value {
    let chain_pem = std::fs::read_to_string(o.identity_dir.join("node.pem")).unwrap();
    let chain: Vec<_> = rustls_pemfile::certs(&mut chain_pem.as_bytes()).map(Result::unwrap).collect();
    let key = std::fs::read_to_string(o.identity_dir.join("node.key")).unwrap();
    let request = Arc::new(grant_request(&o.role, &o.san));
    let requests = o.requests;
    crate::raw::runtime().block_on(async move {
        let mut conns = Vec::new();
        for _ in 0..o.connections {
            let cfg = crate::raw::client_config(&o.ca_pem, Some((chain.clone(), key.clone())));
            conns.push(crate::raw::connect(&o.broker, cfg).await.unwrap());
        }
        let next = Arc::new(AtomicUsize::new(0));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let cpu = CpuMeter::start(o.broker_pid);
        let threads = o.broker_pid.map(thread_cpu_seconds).unwrap_or_default();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..o.concurrency {
            let conn = conns[w % conns.len()].clone();
            let (next, tally, request) = (next.clone(), tally.clone(), request.clone());
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < requests {
                    grant_once(&conn, &request, &tally).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = start.elapsed();
        let tally = tally.lock().unwrap();
        let grants = tally.latencies.len().max(1) as f64;
        let mut by_thread: BTreeMap<String, f64> = o
            .broker_pid
            .map(thread_cpu_seconds)
            .unwrap_or_default()
            .into_iter()
            .map(|(name, cpu)| {
                let used = (cpu - threads.get(&name).copied().unwrap_or(0.0)).max(0.0);
                (name, (used * 1e6 / grants).round())
            })
            .collect();
        // Threads that ended during the run (the writer's signing helpers,
        // blocking-pool threads) are in the process's total only.
        if let Some(total) = cpu.per(tally.latencies.len()) {
            let ended = total - by_thread.values().sum::<f64>();
            by_thread.insert("(ended threads)".into(), ended.max(0.0).round());
        }
        let extra = json!({
            "connections": o.connections,
            "concurrency": o.concurrency,
            "broker_cpu_seconds": cpu.seconds(),
            "broker_cpu_us_per_grant": cpu.per(tally.latencies.len()),
            "broker_cpu_us_per_grant_by_thread": by_thread,
        });
        report(scenario, requests, elapsed, &tally, extra)
    })
}

pub struct VaultLoad {
    pub vault: String,
    pub token: String,
    pub role: String,
    pub san: String,
    pub concurrency: usize,
    pub requests: usize,
    /// OpenBao's pid, for its CPU time per signature.
    pub vault_pid: Option<u32>,
}

/// `pki/sign/:role` straight at OpenBao, `concurrency` clients at once.
pub fn vault_pki(o: &VaultLoad) -> Value {
    let body = json!({"csr": grantline_proto::pem::encode("CERTIFICATE REQUEST", &csr(&o.san)), "common_name": o.san, "ttl": "600s"});
    let url = format!("{}/v1/pki/sign/{}", o.vault, o.role);
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let cpu = CpuMeter::start(o.vault_pid);
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
    let elapsed = start.elapsed();
    let tally = tally.lock().unwrap();
    let extra = json!({
        "concurrency": o.concurrency,
        "vault_cpu_seconds": cpu.seconds(),
        "vault_cpu_us_per_sign": cpu.per(tally.latencies.len()),
    });
    report("openbao-pki-sign", o.requests, elapsed, &tally, extra)
}

/// Fixture identities written by `grantline-loadgen provision`: one shared
/// key (`node.key`, 0600) and, per node, its name and leaf certificate in
/// `identities.bin` (u16 name length, name, u32 DER length, DER; big-endian).
pub struct Fixture {
    pub key_pem: String,
    pub nodes: Vec<(String, Vec<u8>)>,
}

impl Fixture {
    pub fn write(&self, dir: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        grantline_proto::files::write_secret(&dir.join("node.key"), self.key_pem.as_bytes())?;
        let mut out = Vec::new();
        for (name, der) in &self.nodes {
            out.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&u32::try_from(der.len()).unwrap().to_be_bytes());
            out.extend_from_slice(der);
        }
        grantline_proto::files::write_atomic(&dir.join("identities.bin"), &out, 0o600)
    }

    pub fn read(dir: &std::path::Path) -> std::io::Result<Self> {
        let key_pem = grantline_proto::files::read_secret(&dir.join("node.key"))?;
        let bytes = std::fs::read(dir.join("identities.bin"))?;
        let mut nodes = Vec::new();
        let mut b = bytes.as_slice();
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "identities.bin is truncated");
        while !b.is_empty() {
            let n = usize::from(u16::from_be_bytes(b.get(..2).ok_or_else(bad)?.try_into().unwrap()));
            let name = String::from_utf8_lossy(b.get(2..2 + n).ok_or_else(bad)?).into_owned();
            b = &b[2 + n..];
            let len = usize::try_from(u32::from_be_bytes(b.get(..4).ok_or_else(bad)?.try_into().unwrap())).unwrap();
            nodes.push((name, b.get(4..4 + len).ok_or_else(bad)?.to_vec()));
            b = &b[4 + len..];
        }
        Ok(Self { key_pem, nodes })
    }
}

/// Provisions `count` fixture nodes named `{prefix}{i}` in a stopped broker's
/// state directory and writes the fixture to `out`.
pub fn provision(
    state_dir: &std::path::Path,
    prefix: &str,
    count: usize,
    ttl: Duration,
    out: &std::path::Path,
) -> Value {
    let start = Instant::now();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
    let leaves = grantline_daemon::server::provision::provision_nodes(state_dir, &names, &csr, ttl)
        .unwrap_or_else(|e| panic!("provisioning failed: {e:#}"));
    Fixture { key_pem: key.serialize_pem(), nodes: names.into_iter().zip(leaves).collect() }.write(out).unwrap();
    json!({"scenario": "provision", "nodes": count, "seconds": start.elapsed().as_secs_f64(), "fixture": out.display().to_string()})
}

/// The broker's resident memory and CPU time, from /proc.
pub fn process_stats(pid: u32) -> Value {
    let rss_kb: Option<u64> = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok()));
    json!({"pid": pid, "rss_bytes": rss_kb.map(|k| k * 1024), "cpu_seconds": cpu_seconds(pid)})
}

/// CPU time (user and system, every thread) process `pid` has used so far:
/// fields 14 and 15 of /proc/PID/stat, after the parenthesised name, in
/// clock ticks (100 per second on Linux, so 10 ms resolution: measure runs
/// of seconds).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    Some(stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?.1)
}

/// The name and CPU seconds (user + system) in a `/proc/.../stat` line.
fn stat_cpu(stat: &str) -> Option<(&str, f64)> {
    let (head, rest) = stat.rsplit_once(") ")?;
    let name = head.split_once(" (")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((name, (f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?) as f64 / 100.0))
}

/// CPU seconds of a process's threads by thread name (threads of one name
/// summed): which of the broker's threads a unit of work costs.
pub fn thread_cpu_seconds(pid: u32) -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        if let Some((name, cpu)) = std::fs::read_to_string(task.path().join("stat")).ok().as_deref().and_then(stat_cpu)
        {
            *by_name.entry(name.to_owned()).or_insert(0.0) += cpu;
        }
    }
    by_name
}

/// The `ok` count of a report.
fn ok_count(report: &Value) -> usize {
    report["ok"].as_u64().and_then(|n| usize::try_from(n).ok()).unwrap_or(0)
}

/// CPU time a process spends on a piece of work: read before, then
/// [`CpuMeter::per`] divides what it used since by the units of work done.
pub struct CpuMeter {
    pid: Option<u32>,
    start: Option<f64>,
}

impl CpuMeter {
    pub fn start(pid: Option<u32>) -> Self {
        Self { pid, start: pid.and_then(cpu_seconds) }
    }

    /// Counting from the process's own start: every CPU second it used.
    pub fn since_process_start(pid: Option<u32>) -> Self {
        Self { pid, start: Some(0.0) }
    }

    /// Microseconds of CPU per unit over `units` units since the start
    /// (None without a pid or any unit).
    pub fn per(&self, units: usize) -> Option<f64> {
        let used = self.seconds()?;
        (units > 0).then(|| used * 1e6 / units as f64)
    }

    /// CPU seconds used since the start.
    pub fn seconds(&self) -> Option<f64> {
        Some(self.pid.and_then(cpu_seconds)? - self.start?)
    }
}

/// What every fleet scenario shares: where the broker is, which agents, how
/// hard to push.
pub struct FleetLoad {
    pub broker: String,
    pub ca_pem: String,
    pub fixture: PathBuf,
    pub agents: usize,
    pub endpoints: usize,
    /// Handshakes in flight at once.
    pub connect_concurrency: usize,
    pub role: String,
    pub san: String,
    pub broker_pid: Option<u32>,
    /// Agents keep their TLS client across reconnects and resume sessions.
    pub resumption: bool,
}

/// `hold`: grants paced at `grant_rate` per second, or as fast as
/// `concurrency` workers go when it is 0, for `duration`.
pub struct HoldLoad {
    pub fleet: FleetLoad,
    pub grant_rate: f64,
    pub concurrency: usize,
    pub duration: Duration,
}

fn client_config(
    roots: &Arc<rustls::RootCertStore>,
    leaf: &[u8],
    key: &rustls::pki_types::PrivateKeyDer<'static>,
    resumption: bool,
    fleet: bool,
) -> quinn::ClientConfig {
    // The agent's order of cipher suites.
    let provider = Arc::new(grantline_agent::tls::provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(vec![leaf.to_vec().into()], key.clone_key())
        .unwrap();
    tls.alpn_protocols = vec![grantline_proto::ALPN.to_vec()];
    // One broker: room for its latest tickets, not rustls' default 256.
    tls.resumption = if resumption {
        rustls::client::Resumption::in_memory_sessions(2)
    } else {
        rustls::client::Resumption::disabled()
    };
    let mut cfg = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()));
    let mut transport = quinn::TransportConfig::default();
    // No path-MTU probes, as a real agent.
    transport.mtu_discovery_config(None);
    // As often as a real agent: 100,000 of them ping the broker 6,700 times
    // a second; one given several brokers (a fleet) pings more often and
    // gives a silent broker up sooner, to move to another.
    if fleet {
        transport.keep_alive_interval(Some(grantline_agent::tls::FLEET_KEEP_ALIVE));
        transport.max_idle_timeout(Some(grantline_agent::tls::FLEET_IDLE_TIMEOUT.try_into().unwrap()));
    } else {
        transport.keep_alive_interval(Some(grantline_agent::tls::KEEP_ALIVE));
    }
    cfg.transport_config(Arc::new(transport));
    cfg
}

/// A client endpoint whose socket has a receive buffer as large as the
/// broker's (RFD 0008): thousands of agents share it, and with the default
/// the kernel drops their packets before the load generator reads them.
fn client_endpoint() -> quinn::Endpoint {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let _ = nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBuf, &(8 << 20));
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, Arc::new(quinn::TokioRuntime)).unwrap()
}

/// The fixture's agents and the client sockets they share.
pub(crate) struct Fleet {
    /// The brokers (`FleetLoad::broker`, comma-separated): agent `i` is at
    /// `addrs[i % addrs.len()]`.
    pub(crate) addrs: Vec<std::net::SocketAddr>,
    roots: Arc<rustls::RootCertStore>,
    key: Arc<rustls::pki_types::PrivateKeyDer<'static>>,
    pub(crate) leaves: Vec<Vec<u8>>,
    /// Each agent's TLS client, made at its first connection and kept (it
    /// holds the agent's session tickets); None without resumption.
    clients: Option<Vec<std::sync::OnceLock<quinn::ClientConfig>>>,
    endpoints: Vec<quinn::Endpoint>,
    limit: Arc<tokio::sync::Semaphore>,
}

impl Fleet {
    /// Call inside a tokio runtime.
    pub(crate) fn new(o: &FleetLoad) -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let fixture = Fixture::read(&o.fixture).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut o.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let key = rustls_pemfile::private_key(&mut fixture.key_pem.as_bytes()).unwrap().unwrap();
        Self {
            addrs: o.broker.split(',').map(|a| a.trim().parse().unwrap()).collect(),
            roots: Arc::new(roots),
            key: Arc::new(key),
            leaves: fixture.nodes.into_iter().take(o.agents).map(|(_, der)| der).collect(),
            clients: o.resumption.then(|| (0..o.agents).map(|_| std::sync::OnceLock::new()).collect()),
            endpoints: (0..o.endpoints.max(1)).map(|_| client_endpoint()).collect(),
            limit: Arc::new(tokio::sync::Semaphore::new(o.connect_concurrency.max(1))),
        }
    }

    /// Connects agent `i`, waiting for one of the load generator's handshake
    /// slots, and coming back after a refusal as the agent does; the
    /// connection, how long its handshake took (the waits excluded), and how
    /// often the broker refused it first.
    fn connect(
        &self,
        i: usize,
    ) -> impl std::future::Future<Output = Result<(quinn::Connection, Duration, u32, u32), ConnectFailure>> + Send + 'static
    {
        let (limit, dialer) = (self.limit.clone(), self.dialer(i));
        async move {
            let (mut refusals, mut timeouts) = (0u32, 0u32);
            loop {
                let permit = limit.acquire().await.unwrap();
                let dialed = dialer.dial().await;
                drop(permit);
                match dialed {
                    // A handshake lost under load is tried again, as the
                    // agent reconnects after any failure; once only, so a
                    // broker that never answers is still reported.
                    Err(e) if e.what == HANDSHAKE_TIMEOUT && timeouts < 1 => timeouts += 1,
                    Err(e) if !e.retry_after.is_zero() && refusals < 30 => {
                        let unit = rand::random::<f64>();
                        let wait =
                            grantline_agent::connection::reconnect_wait(refusals, e.retry_after, Duration::ZERO, unit);
                        tokio::time::sleep(wait).await;
                        refusals += 1;
                    }
                    Err(e) => return Err(e),
                    Ok((c, t)) => return Ok((c, t, refusals, timeouts)),
                }
            }
        }
    }

    /// What agent `i` connects with.
    fn dialer(&self, i: usize) -> Dialer {
        self.dialer_at(i, i % self.addrs.len())
    }

    /// What agent `i` connects to broker `b` with.
    pub(crate) fn dialer_at(&self, i: usize, b: usize) -> Dialer {
        let fleet = self.addrs.len() > 1;
        Dialer {
            ep: self.endpoints[i % self.endpoints.len()].clone(),
            cfg: match &self.clients {
                Some(c) => {
                    c[i].get_or_init(|| client_config(&self.roots, &self.leaves[i], &self.key, true, fleet)).clone()
                }
                None => client_config(&self.roots, &self.leaves[i], &self.key, false, fleet),
            },
            addr: self.addrs[b],
        }
    }

    /// Connects every agent; the connections (in agent order, None where it
    /// failed) and the connect report.
    pub(crate) async fn connect_all(&self) -> (Vec<Option<quinn::Connection>>, Value) {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..self.leaves.len() {
            let (connect, tally) = (self.connect(i), tally.clone());
            tasks.spawn(async move {
                let c = connect.await;
                let mut tally = tally.lock().unwrap();
                match c {
                    Ok((c, handshake, refusals, timeouts)) => {
                        tally.latencies.push(handshake);
                        if refusals > 0 {
                            *tally.retries.entry("handshake: refused".into()).or_default() += refusals as usize;
                        }
                        if timeouts > 0 {
                            *tally.retries.entry(HANDSHAKE_TIMEOUT.into()).or_default() += timeouts as usize;
                        }
                        (i, Some(c))
                    }
                    Err(e) => {
                        *tally.errors.entry(e.what).or_default() += 1;
                        (i, None)
                    }
                }
            });
        }
        let mut conns = vec![None; self.leaves.len()];
        while let Some(done) = tasks.join_next().await {
            let (i, c) = done.unwrap();
            conns[i] = c;
        }
        let tally = tally.lock().unwrap();
        let report = report("connect", self.leaves.len(), start.elapsed(), &tally, json!({"retries": tally.retries}));
        (conns, report)
    }

    pub(crate) async fn close(&self, conns: &[quinn::Connection]) {
        for c in conns {
            c.close(0u32.into(), b"loadgen done");
        }
        let idle: Vec<_> = self.endpoints.iter().map(quinn::Endpoint::wait_idle).collect();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            for w in idle {
                w.await;
            }
        })
        .await;
    }
}

/// Grants over `conns` at `rate` per second for `duration`.
async fn paced(conns: &Arc<Vec<quinn::Connection>>, request: &Arc<Vec<u8>>, rate: f64, duration: Duration) -> Value {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let mut sent = 0usize;
    let mut workers = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut owed = 0.0f64;
    while start.elapsed() < duration && !conns.is_empty() {
        tick.tick().await;
        owed += rate / 100.0;
        while owed >= 1.0 {
            owed -= 1.0;
            let (conn, tally, request) = (conns[sent % conns.len()].clone(), tally.clone(), request.clone());
            sent += 1;
            workers.spawn(async move { grant_once(&conn, &request, &tally).await });
        }
    }
    while workers.join_next().await.is_some() {}
    let t = tally.lock().unwrap();
    report("grants", sent, start.elapsed(), &t, json!({"target_per_second": rate}))
}

/// Grants over `conns` as fast as `concurrency` workers go, for `duration`.
async fn flat_out(
    conns: &Arc<Vec<quinn::Connection>>,
    request: &Arc<Vec<u8>>,
    concurrency: usize,
    duration: Duration,
) -> Value {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let sent = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..concurrency.max(1) {
        let (conns, tally, request, sent) = (conns.clone(), tally.clone(), request.clone(), sent.clone());
        workers.spawn(async move {
            let mut i = w;
            while start.elapsed() < duration && !conns.is_empty() {
                sent.fetch_add(1, Ordering::Relaxed);
                grant_once(&conns[i % conns.len()], &request, &tally).await;
                i += 7919;
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let t = tally.lock().unwrap();
    report("grants", sent.load(Ordering::Relaxed), start.elapsed(), &t, json!({"concurrency": concurrency}))
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Scenario 1: connects the fixture's agents over `endpoints` UDP sockets,
/// holds the connections, asks for grants for `duration`, and reports the
/// broker's memory per connected agent.
pub fn hold(o: &HoldLoad) -> Value {
    let f = &o.fleet;
    let request = Arc::new(grant_request(&f.role, &f.san));
    runtime().block_on(async move {
        let fleet = Fleet::new(f);
        let handshakes = CpuMeter::start(f.broker_pid);
        let (conns, connect) = fleet.connect_all().await;
        let connected_stats = f.broker_pid.map(process_stats);
        let conns: Arc<Vec<quinn::Connection>> = Arc::new(conns.into_iter().flatten().collect());
        let cpu_per_handshake = handshakes.per(conns.len());
        let granting = CpuMeter::start(f.broker_pid);
        let grants = if o.grant_rate > 0.0 {
            paced(&conns, &request, o.grant_rate, o.duration).await
        } else {
            flat_out(&conns, &request, o.concurrency, o.duration).await
        };
        // Over the grant phase, which also carries the held agents' keep-alives.
        let cpu_per_grant = granting.per(ok_count(&grants));
        let still_connected = conns.iter().filter(|c| c.close_reason().is_none()).count();
        let broker = f.broker_pid.map(process_stats);
        fleet.close(&conns).await;
        let rss_per_agent = connected_stats
            .as_ref()
            .and_then(|s| s["rss_bytes"].as_u64())
            .filter(|_| still_connected > 0)
            .map(|rss| rss / still_connected as u64);
        json!({
            "scenario": "hold",
            "agents": fleet.leaves.len(),
            "endpoints": f.endpoints,
            "connected": conns.len(),
            "still_connected": still_connected,
            "connect_seconds": connect["seconds"],
            "connect": connect,
            "grants": grants,
            "broker_when_connected": connected_stats,
            "broker": broker,
            "broker_rss_per_agent_bytes": rss_per_agent,
            "broker_cpu_us_per_handshake": cpu_per_handshake,
            "broker_cpu_us_per_grant": cpu_per_grant,
        })
    })
}

/// Scenario 2: grants at rising rates (each `step` long, ×1.5 each time)
/// until the broker falls behind (under 90 % of the target, any error, or
/// p99 over 100 ms); then `step` at half the peak for its p99.
pub fn sweep(f: &FleetLoad, start_rate: f64, step: Duration) -> Value {
    let request = Arc::new(grant_request(&f.role, &f.san));
    runtime().block_on(async move {
        let fleet = Fleet::new(f);
        let (conns, connect) = fleet.connect_all().await;
        let conns: Arc<Vec<quinn::Connection>> = Arc::new(conns.into_iter().flatten().collect());
        let mut steps = Vec::new();
        let mut peak = 0.0f64;
        let mut rate = start_rate.max(1.0);
        loop {
            let r = paced(&conns, &request, rate, step).await;
            let achieved = r["per_second"].as_f64().unwrap_or(0.0);
            let p99 = r["latency_ms"]["p99"].as_f64().unwrap_or(f64::MAX);
            let errors = r["errors"].as_object().map_or(0, serde_json::Map::len);
            steps.push(r);
            if achieved < 0.9 * rate || errors > 0 || p99 > 100.0 || steps.len() >= 20 {
                peak = peak.max(achieved);
                break;
            }
            peak = peak.max(achieved);
            rate *= 1.5;
        }
        let at_half = CpuMeter::start(f.broker_pid);
        let half = paced(&conns, &request, peak / 2.0, step).await;
        let cpu_per_grant = at_half.per(ok_count(&half));
        let broker = f.broker_pid.map(process_stats);
        fleet.close(&conns).await;
        json!({
            "scenario": "sweep",
            "agents": fleet.leaves.len(),
            "connected": conns.len(),
            "connect": connect,
            "steps": steps,
            "peak_per_second": peak,
            "at_half_peak": half,
            "p99_ms_at_half_peak": half["latency_ms"]["p99"],
            "broker_cpu_us_per_grant_at_half_peak": cpu_per_grant,
            "broker": broker,
        })
    })
}

/// Scenario 3: connects every agent and grants once to each; then, once
/// `ready_file` exists (created here) and the broker has been restarted by
/// someone else (all connections lost), reconnects every agent with full
/// jitter and grants once more, timing how long until all are re-granted.
/// The broker's pid is read from `pid_file` at the end, when given (the
/// restarted broker is another process).
pub fn storm(
    f: &FleetLoad,
    ready_file: &std::path::Path,
    limit: Duration,
    pid_file: Option<&std::path::Path>,
) -> Value {
    let request = Arc::new(grant_request(&f.role, &f.san));
    runtime().block_on(async move {
        let fleet = Arc::new(Fleet::new(f));
        let (by_agent, connect) = fleet.connect_all().await;
        let conns: Vec<quinn::Connection> = by_agent.iter().flatten().cloned().collect();
        let before = Arc::new(Mutex::new(Tally::default()));
        let mut grants = tokio::task::JoinSet::new();
        // One grant each before the restart, a bounded number at a time:
        // this phase only sets the scene.
        let in_flight = Arc::new(tokio::sync::Semaphore::new(512));
        for c in &conns {
            let (c, request, before, in_flight) = (c.clone(), request.clone(), before.clone(), in_flight.clone());
            grants.spawn(async move {
                let _permit = in_flight.acquire().await.unwrap();
                grant_once(&c, &request, &before).await;
            });
        }
        while grants.join_next().await.is_some() {}
        std::fs::write(ready_file, b"connected\n").unwrap();
        // Wait for the restart to cut every connection.
        let cut = tokio::time::timeout(limit, async {
            for c in &conns {
                c.closed().await;
            }
        })
        .await
        .is_ok();
        let storm_start = Instant::now();
        let after = Arc::new(Mutex::new(Tally::default()));
        let mut agents = tokio::task::JoinSet::new();
        // What the broker asked for when it closed (a graceful restart sends
        // a retry-after and a spread); agents wait as the agent does.
        let first_wait: Vec<Duration> = by_agent
            .iter()
            .map(|c| {
                let asked = c
                    .as_ref()
                    .and_then(quinn::Connection::close_reason)
                    .and_then(|e| grantline_agent::connection::close_reason(&e));
                let ms = |v: u32| Duration::from_millis(u64::from(v));
                let (after, spread) = asked.map_or((Duration::ZERO, Duration::ZERO), |e| {
                    (ms(e.retry_after_ms), ms(e.retry_spread_ms))
                });
                grantline_agent::connection::reconnect_wait(0, after, spread, rand::random::<f64>())
            })
            .collect();
        for (i, wait) in first_wait.into_iter().enumerate() {
            let (fleet, request, after) = (fleet.clone(), request.clone(), after.clone());
            agents.spawn(async move {
                tokio::time::sleep(wait).await;
                let mut attempt = 1u32;
                while storm_start.elapsed() < limit {
                    // At once, as a real agent does: agents do not coordinate,
                    // only the broker's admission control paces them.
                    let retry_after = match fleet.dialer(i).dial().await {
                        Ok((conn, _)) => {
                            let got = Arc::new(Mutex::new(Tally::default()));
                            grant_once(&conn, &request, &got).await;
                            let ok = !got.lock().unwrap().latencies.is_empty();
                            if ok {
                                after.lock().unwrap().latencies.push(storm_start.elapsed());
                                return Some(conn);
                            }
                            Duration::ZERO
                        }
                        Err(e) => {
                            *after.lock().unwrap().retries.entry(e.what).or_default() += 1;
                            e.retry_after
                        }
                    };
                    // The agent's own reconnect policy.
                    let unit = rand::random::<f64>();
                    let wait = grantline_agent::connection::reconnect_wait(attempt, retry_after, Duration::ZERO, unit);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                *after.lock().unwrap().errors.entry("not re-granted within the limit".into()).or_default() += 1;
                None
            });
        }
        let mut reconnected = Vec::new();
        while let Some(done) = agents.join_next().await {
            reconnected.extend(done.unwrap());
        }
        let storm_seconds = storm_start.elapsed().as_secs_f64();
        let broker_pid: Option<u32> =
            pid_file.and_then(|p| std::fs::read_to_string(p).ok()).and_then(|p| p.trim().parse().ok()).or(f.broker_pid);
        let broker = broker_pid.map(process_stats);
        // The restarted broker's every CPU second, its start included, over
        // the agents it re-granted.
        let cpu_per_regrant = CpuMeter::since_process_start(broker_pid).per(after.lock().unwrap().latencies.len());
        fleet.close(&reconnected).await;
        let before = before.lock().unwrap();
        let after = after.lock().unwrap();
        json!({
            "scenario": "storm",
            "agents": fleet.leaves.len(),
            "connected": conns.len(),
            "connect": connect,
            "granted_before": before.latencies.len(),
            "errors_before": before.errors,
            "all_cut": cut,
            "regranted": after.latencies.len(),
            "errors_after": after.errors,
            "retries_after": after.retries,
            "storm_seconds": storm_seconds,
            "regranted_within_ms": report("storm", fleet.leaves.len(), storm_start.elapsed(), &after, json!({}))["latency_ms"],
            "broker": broker,
            "broker_cpu_us_per_regranted_agent": cpu_per_regrant,
        })
    })
}

/// One grant over `conn`, tallied; the grant, when granted.
pub(crate) async fn grant_once(
    conn: &quinn::Connection,
    request: &[u8],
    tally: &Mutex<Tally>,
) -> Option<wire::GrantResponse> {
    let t = Instant::now();
    let outcome = crate::raw::send_raw(conn, request).await;
    let mut tally = tally.lock().unwrap();
    match outcome {
        Ok(wire::Response { body: Some(wire::response::Body::Grant(g)) }) => {
            tally.latencies.push(t.elapsed());
            return Some(g);
        }
        Ok(wire::Response { body: Some(wire::response::Body::Error(e)) }) => {
            let code = wire::ErrorCode::try_from(e.code).unwrap_or_default();
            *tally.errors.entry(format!("{code:?}")).or_default() += 1;
        }
        Ok(_) => *tally.errors.entry("unexpected".into()).or_default() += 1,
        Err(e) => *tally.errors.entry(format!("transport: {e}")).or_default() += 1,
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread name may hold ") " itself: the name runs to the last ") ".
    #[test]
    fn reads_the_name_and_cpu_of_a_stat_line() {
        let line = "42 (audit) writer) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 1 0 5 6 7";
        assert_eq!(stat_cpu(line), Some(("audit) writer", 4.0)));
        assert_eq!(stat_cpu("42 (short) S 1"), None);
    }

    #[test]
    fn finds_this_process_threads_by_name() {
        let main = std::thread::current().name().map(|n| n.chars().take(15).collect::<String>());
        let threads = thread_cpu_seconds(std::process::id());
        assert!(main.is_some_and(|n| threads.contains_key(&n)), "{threads:?}");
        assert!(threads.values().all(|cpu| *cpu >= 0.0));
    }
}
