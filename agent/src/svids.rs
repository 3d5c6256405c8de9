//! The SVIDs the agent holds for its local callers (RFD 0011): one X509-SVID
//! per attested caller (uid, gid, executable, unit), renewed before its
//! half-life and pushed to every stream that watches it; JWT-SVIDs per
//! audience, reused until their half-life. Every SVID comes from the broker,
//! which audits it first; its receipt is checked here before anyone sees it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grantline_proto::audit::{Entry, Event};
use grantline_proto::clock::now_unix as now;
use grantline_proto::kind::Kind;
use grantline_proto::wire::{self, ErrorCode};
use rand::Rng;
use tokio::sync::watch;

use crate::local::ProcessMark;
use crate::renew::{backoff, renew_at};
use crate::session::Agent;

/// Who is at the other end of a SPIFFE socket connection, attested when it
/// connected (SO_PEERCRED, then /proc under a pidfd); None if the kernel
/// could not tell.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    pub caller: Option<wire::Caller>,
    pub mark: Option<ProcessMark>,
}

impl Peer {
    /// The caller, if it is still the process that connected (same start
    /// time, same executable): a process that passed its socket on, or
    /// exec'd another program, is not the caller it was.
    pub(crate) fn current(&self) -> Option<&wire::Caller> {
        let c = self.caller.as_ref()?;
        (crate::local::process_mark(c.pid).as_ref() == self.mark.as_ref()).then_some(c)
    }
}

/// What SVIDs are keyed by: the caller's attested attributes, not its pid.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CallerKey {
    uid: u32,
    gid: u32,
    exe: String,
    unit: String,
}

impl CallerKey {
    fn of(c: &wire::Caller) -> Self {
        Self { uid: c.uid, gid: c.gid, exe: c.exe.clone(), unit: c.unit.clone() }
    }
}

/// One X509-SVID with its key and the trust domain's bundles.
pub(crate) struct X509Svid {
    pub spiffe_id: String,
    pub trust_domain: String,
    /// Leaf first, then the intermediates (DER).
    pub chain_der: Vec<Vec<u8>>,
    pub chain_pem: String,
    /// PKCS#8, unencrypted, as the Workload API carries it.
    pub key_der: Vec<u8>,
    pub key_pem: String,
    /// The trust bundle's roots.
    pub bundle_der: Vec<Vec<u8>>,
    pub bundle_pem: String,
    /// The JWT signing keys (JWKS).
    pub jwt_bundle: String,
    pub serial: String,
    pub not_after: i64,
}

impl X509Svid {
    /// The trust domain's SPIFFE ID, which keys bundles.
    pub(crate) fn trust_domain_id(&self) -> String {
        format!("spiffe://{}", self.trust_domain)
    }
}

impl Drop for X509Svid {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.key_der.zeroize();
        self.key_pem.zeroize();
    }
}

/// Where a caller's X509-SVID stands.
#[derive(Clone)]
pub(crate) enum State {
    Pending,
    Ready(Arc<X509Svid>),
    /// The broker refused (policy gives the caller no ID), or none could be
    /// had and none is held.
    Refused(wire::Error),
}

struct Identity {
    state: watch::Sender<State>,
    /// When a caller last asked (unix seconds): an identity nobody watches
    /// or asks for is dropped after [`IDLE`].
    used: std::sync::atomic::AtomicI64,
}

/// How long an identity nobody uses is kept (and renewed).
const IDLE: i64 = 300;
/// How long a refused caller waits before the broker is asked again.
const REFUSED_RETRY: Duration = Duration::from_secs(30);
/// The most callers holding SVIDs at once; past it, new callers wait for
/// idle ones to go.
pub(crate) const MAX_IDENTITIES: usize = 1024;
/// The most JWT-SVIDs kept for reuse.
const MAX_JWTS: usize = 4096;

/// A cached JWT-SVID's key: the caller, its sorted audiences, the ID asked.
type JwtKey = (CallerKey, Vec<String>, String);

struct CachedJwt {
    spiffe_id: String,
    token: String,
    /// Reused until this time (unix seconds): its half-life.
    reuse_until: i64,
}

pub(crate) struct Svids {
    agent: Arc<Agent>,
    /// The role SVID requests name (the broker's policy rules match it).
    role: String,
    identities: Mutex<HashMap<CallerKey, Arc<Identity>>>,
    jwts: Mutex<HashMap<JwtKey, CachedJwt>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Svids {
    pub(crate) fn new(agent: Arc<Agent>, role: String) -> Arc<Self> {
        Arc::new(Self { agent, role, identities: Mutex::new(HashMap::new()), jwts: Mutex::new(HashMap::new()) })
    }

    /// The caller's X509-SVID state, to watch: its keeper starts on first use.
    pub(crate) fn watch(self: &Arc<Self>, caller: &wire::Caller) -> Result<watch::Receiver<State>, wire::Error> {
        self.agent_allows(caller, Kind::X509Svid)?;
        let key = CallerKey::of(caller);
        let mut map = lock(&self.identities);
        if let Some(id) = map.get(&key) {
            id.used.store(now(), std::sync::atomic::Ordering::Relaxed);
            return Ok(id.state.subscribe());
        }
        if map.len() >= MAX_IDENTITIES {
            return Err(wire::Error::new(
                ErrorCode::Unavailable,
                format!("the agent holds SVIDs for {MAX_IDENTITIES} callers; retry once idle ones are dropped"),
            ));
        }
        let id = Arc::new(Identity { state: watch::channel(State::Pending).0, used: now().into() });
        let rx = id.state.subscribe();
        map.insert(key.clone(), id.clone());
        tokio::spawn(self.clone().keep(key, caller.clone(), id));
        Ok(rx)
    }

    /// The caller's X509-SVID once there is one (or why there is none).
    pub(crate) async fn current(self: &Arc<Self>, caller: &wire::Caller) -> Result<Arc<X509Svid>, wire::Error> {
        let mut rx = self.watch(caller)?;
        let settled = {
            let wait = rx.wait_for(|s| !matches!(s, State::Pending));
            match tokio::time::timeout(Duration::from_secs(30), wait).await {
                Err(_) => None,
                Ok(r) => Some(r.map(|s| s.clone())),
            }
        };
        match settled {
            None => Err(wire::Error::new(ErrorCode::Unavailable, "no SVID from the broker within 30 s")),
            Some(Err(_)) => Err(wire::Error::new(ErrorCode::Unavailable, "the agent is stopping")),
            Some(Ok(State::Ready(svid))) => Ok(svid),
            Some(Ok(State::Refused(e))) => Err(e),
            Some(Ok(State::Pending)) => Err(wire::Error::new(ErrorCode::Internal, "SVID still pending")),
        }
    }

    /// agent.toml's `[[allow]]` rules, when it has any, also bind the
    /// SPIFFE socket; without them the broker's policy alone decides.
    fn agent_allows(&self, caller: &wire::Caller, kind: Kind) -> Result<(), wire::Error> {
        if self.agent.policy.allow.is_none() {
            return Ok(());
        }
        self.agent
            .check_caller(Some(caller), kind, &self.role)
            .map_err(|r| wire::Error::new(ErrorCode::PermissionDenied, r))
    }

    /// Obtains and renews one caller's X509-SVID while anyone uses it.
    async fn keep(self: Arc<Self>, key: CallerKey, caller: wire::Caller, id: Arc<Identity>) {
        let mut failures = 0u32;
        loop {
            let wait = match self.obtain_x509(&caller).await {
                Ok(svid) => {
                    failures = 0;
                    let (start, not_after) = (now(), svid.not_after);
                    tracing::info!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, not_after, uid = caller.uid, "X509-SVID issued");
                    id.state.send_replace(State::Ready(Arc::new(svid)));
                    // Before its half-life: 45 to 50 % of its lifetime.
                    let at = renew_at(start, not_after, -rand::thread_rng().gen::<f64>(), now());
                    Duration::from_secs(u64::try_from(at - now()).unwrap_or(0))
                }
                Err(e) => {
                    let refused = matches!(
                        ErrorCode::try_from(e.code),
                        Ok(ErrorCode::PermissionDenied | ErrorCode::BadRequest | ErrorCode::Revoked)
                    );
                    let held = matches!(&*id.state.borrow(), State::Ready(s) if s.not_after > now());
                    tracing::warn!(uid = caller.uid, unit = %caller.unit, error = %e, "no X509-SVID for a caller");
                    if refused || !held {
                        id.state.send_replace(State::Refused(e));
                    }
                    failures = failures.saturating_add(1);
                    if refused {
                        REFUSED_RETRY
                    } else {
                        backoff(failures, Duration::from_secs(1), Duration::from_secs(30), rand::thread_rng().gen())
                            .max(Duration::from_millis(200))
                    }
                }
            };
            tokio::time::sleep(wait).await;
            let idle = now() - id.used.load(std::sync::atomic::Ordering::Relaxed) > IDLE;
            if id.state.receiver_count() == 0 && idle {
                lock(&self.identities).remove(&key);
                tracing::debug!(uid = caller.uid, "SVID of an idle caller dropped");
                return;
            }
        }
    }

    async fn obtain_x509(&self, caller: &wire::Caller) -> Result<X509Svid, wire::Error> {
        obtain_x509(&self.agent, &self.role, 0, caller).await
    }

    /// A JWT-SVID for the caller and `audience` (`spiffe_id` empty: its
    /// first ID), reused until its half-life.
    pub(crate) async fn jwt(
        &self,
        caller: &wire::Caller,
        audience: Vec<String>,
        spiffe_id: String,
    ) -> Result<(String, String), wire::Error> {
        self.agent_allows(caller, Kind::JwtSvid)?;
        let mut aud = audience.clone();
        aud.sort();
        let key = (CallerKey::of(caller), aud, spiffe_id.clone());
        if let Some(c) = lock(&self.jwts).get(&key).filter(|c| c.reuse_until > now()) {
            return Ok((c.spiffe_id.clone(), c.token.clone()));
        }
        let g = wire::GrantRequest {
            kind: Kind::JwtSvid.wire() as i32,
            role: self.role.clone(),
            audience,
            spiffe_id,
            caller: Some(caller.clone()),
            ..Default::default()
        };
        let gr = self.agent.grant(g).await?;
        check_receipt_names(&gr).map_err(|e| {
            wire::Error::new(ErrorCode::Internal, format!("the broker's JWT-SVID was discarded: {e:#}"))
        })?;
        let start = now();
        let mut jwts = lock(&self.jwts);
        if jwts.len() >= MAX_JWTS {
            jwts.retain(|_, c| c.reuse_until > start);
        }
        if jwts.len() < MAX_JWTS {
            let reuse_until = start + (gr.not_after_unix - start) / 2;
            let cached = CachedJwt { spiffe_id: gr.spiffe_id.clone(), token: gr.jwt_svid.clone(), reuse_until };
            jwts.insert(key, cached);
        }
        Ok((gr.spiffe_id, gr.jwt_svid))
    }
}

/// Obtains an X509-SVID for `caller` under `role` (for the SPIFFE socket's
/// callers, and the agent's own x509-svid sinks), checked.
pub(crate) async fn obtain_x509(
    agent: &Agent,
    role: &str,
    ttl_seconds: u32,
    caller: &wire::Caller,
) -> Result<X509Svid, wire::Error> {
    let internal = |e: String| wire::Error::new(ErrorCode::Internal, e);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| internal(e.to_string()))?;
    // No name at all: the SVID's one name is the SPIFFE ID policy gives.
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| internal(e.to_string()))?;
    let g = wire::GrantRequest {
        kind: Kind::X509Svid.wire() as i32,
        role: role.to_owned(),
        ttl_seconds,
        csr_der: csr.der().to_vec(),
        caller: Some(caller.clone()),
        ..Default::default()
    };
    let gr = agent.grant(g).await?;
    x509_svid(&gr, &key).map_err(|e| {
        tracing::error!(error = %format!("{e:#}"), "the broker's X509-SVID does not check out; discarded");
        internal(format!("the broker's X509-SVID was discarded: {e:#}"))
    })
}

/// The receipt must record the SPIFFE ID the reply carries.
pub(crate) fn check_receipt_names(gr: &wire::GrantResponse) -> Result<()> {
    let entry = gr.receipt.as_ref().map(|r| Entry::decode(&r.entry)).transpose()?.context("no receipt")?;
    match entry.event()? {
        Event::Grant { spiffe_id, .. } if spiffe_id == gr.spiffe_id && !spiffe_id.is_empty() => Ok(()),
        _ => bail!("the receipt does not record SPIFFE ID {:?}", gr.spiffe_id),
    }
}

fn pem_ders(pem: &str, what: &str) -> Result<Vec<Vec<u8>>> {
    let ders: Vec<Vec<u8>> = rustls_pemfile::certs(&mut pem.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("the {what} is not PEM"))?;
    if ders.is_empty() {
        bail!("the reply carries no {what}");
    }
    Ok(ders)
}

/// Checks an X509-SVID reply against the key made for it: the certificate
/// certifies the key and names exactly the SPIFFE ID the reply and its
/// receipt name, as its only URI SAN.
pub(crate) fn x509_svid(gr: &wire::GrantResponse, key: &rcgen::KeyPair) -> Result<X509Svid> {
    crate::credentials::check_x509(gr, key)?;
    check_receipt_names(gr)?;
    let leaf_der = pem_ders(&gr.cert_pem, "certificate")?.swap_remove(0);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).context("the X509-SVID does not parse")?;
    let uris: Vec<&str> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris != [gr.spiffe_id.as_str()] {
        bail!("the X509-SVID's URI SANs {uris:?} are not exactly {:?}", gr.spiffe_id);
    }
    let serial = hex::encode(leaf.raw_serial());
    let mut chain_der = vec![leaf_der.clone()];
    chain_der.extend(pem_ders(&gr.chain_pem, "intermediate chain")?);
    let bundle_der = pem_ders(&gr.x509_bundle_pem, "X.509 trust bundle")?;
    if gr.trust_domain.is_empty() || !gr.spiffe_id.starts_with(&format!("spiffe://{}/", gr.trust_domain)) {
        bail!("{:?} is not in the reply's trust domain {:?}", gr.spiffe_id, gr.trust_domain);
    }
    Ok(X509Svid {
        spiffe_id: gr.spiffe_id.clone(),
        trust_domain: gr.trust_domain.clone(),
        chain_pem: format!("{}{}", gr.cert_pem, gr.chain_pem),
        chain_der,
        key_der: key.serialize_der(),
        key_pem: key.serialize_pem(),
        bundle_der,
        bundle_pem: gr.x509_bundle_pem.clone(),
        jwt_bundle: gr.jwt_bundle_json.clone(),
        serial,
        not_after: gr.not_after_unix,
    })
}
