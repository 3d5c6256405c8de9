//! The SVIDs the agent holds for its local callers (RFD 0011): one X509-SVID
//! per attested caller (uid, gid, executable, unit), renewed before its
//! half-life and pushed to every stream that watches it; JWT-SVIDs per
//! audience, reused until their half-life. Every SVID comes from the broker,
//! which audits it first; its receipt is checked here before anyone sees it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grantline_proto::clock::now_unix as now;
use grantline_proto::kind::Kind;
use grantline_proto::wire::{self, ErrorCode};
use rand::Rng;
use tokio::sync::watch;

use crate::jwt_cache::{cache_jwt, CachedJwt, JwtKey};
use crate::local::{CallerKey, ProcessMark};
use crate::principals::{Principal, Principals};
use crate::renew::{backoff, renew_at};
use crate::session::Agent;
use crate::svid::{check_receipt_names, obtain_x509, X509Svid};
use crate::svid_budget::{too_many_asks, Budget};

/// Who is at the other end of a SPIFFE socket connection, attested when it
/// connected (SO_PEERCRED, then /proc under a pidfd); None if the kernel
/// could not tell.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    pub caller: Option<wire::Caller>,
    pub mark: Option<ProcessMark>,
    /// Whom the caller answers to (its share and budget).
    pub principal: Principal,
}

impl Peer {
    /// The caller, if it is still the process that connected (same start
    /// time, same executable): a process that passed its socket on, or
    /// exec'd another program, is not the caller it was. A caller read
    /// without a pidfd pinning it, or whose mark could not be taken, is not
    /// attested at all: what /proc said might describe another process.
    pub(crate) fn current(&self) -> Option<&wire::Caller> {
        let c = self.caller.as_ref().filter(|c| c.pidfd)?;
        let mark = self.mark.as_ref()?;
        (crate::local::process_mark(c.pid).as_ref() == Some(mark)).then_some(c)
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
    /// Told when the identity leaves a full table, so its keeper stops.
    evicted: tokio::sync::Notify,
    /// When a caller last asked (unix seconds): an identity nobody watches
    /// or asks for is dropped after [`IDLE`].
    used: std::sync::atomic::AtomicI64,
}

/// How long an identity nobody uses is kept (and renewed).
const IDLE: i64 = 300;
/// How long a refused caller waits before the broker is asked again.
const REFUSED_RETRY: Duration = Duration::from_secs(30);
/// How often a keeper looks whether its identity is still used.
const CHECK: Duration = Duration::from_secs(30);
/// The most callers holding SVIDs at once; past it, new callers wait for
/// idle ones to go.
pub(crate) const MAX_IDENTITIES: usize = 1024;
pub(crate) struct Svids {
    agent: Arc<Agent>,
    /// The role SVID requests name (the broker's policy rules match it).
    role: String,
    identities: Mutex<HashMap<CallerKey, Arc<Identity>>>,
    jwts: Mutex<HashMap<JwtKey, CachedJwt>>,
    budget: Mutex<Budget>,
    /// Whom each uid answers to, for shares and budgets.
    principals: Principals,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Svids {
    /// `per_second`: new SVIDs asked of the broker per principal per second (see [`Budget`]).
    pub(crate) fn new(agent: Arc<Agent>, role: String, per_second: u32, principals: Principals) -> Arc<Self> {
        Arc::new(Self {
            principals,
            agent,
            role,
            identities: Mutex::new(HashMap::new()),
            jwts: Mutex::new(HashMap::new()),
            budget: Mutex::new(Budget::new(per_second)),
        })
    }

    /// The principal of a caller with `uid` in user namespace `namespace`.
    pub(crate) fn principal(&self, uid: u32, namespace: Option<u64>) -> Principal {
        self.principals.of(uid, namespace)
    }

    /// Spends one of `principal`'s broker asks, or says that `uid` has none left.
    fn spend(&self, principal: Principal, uid: u32) -> Result<(), wire::Error> {
        if lock(&self.budget).take(principal, std::time::Instant::now()) {
            Ok(())
        } else {
            Err(too_many_asks(uid))
        }
    }

    /// The caller's X509-SVID state, to watch: its keeper starts on first use.
    pub(crate) fn watch(
        self: &Arc<Self>,
        caller: &wire::Caller,
        principal: Principal,
    ) -> Result<watch::Receiver<State>, wire::Error> {
        self.agent_allows(caller, Kind::X509Svid)?;
        let key = CallerKey::of(caller);
        let mut map = lock(&self.identities);
        if let Some(id) = map.get(&key) {
            id.used.store(now(), std::sync::atomic::Ordering::Relaxed);
            return Ok(id.state.subscribe());
        }
        // The budget first: a caller with none left evicts no one.
        self.spend(principal, caller.uid)?;
        if map.len() >= MAX_IDENTITIES && !evict_unwatched(&mut map) {
            return Err(wire::Error::new(
                ErrorCode::Unavailable,
                format!("the agent holds SVIDs for {MAX_IDENTITIES} callers, all watched; retry once some go"),
            ));
        }
        let id = Arc::new(Identity {
            state: watch::channel(State::Pending).0,
            evicted: tokio::sync::Notify::new(),
            used: now().into(),
        });
        let rx = id.state.subscribe();
        map.insert(key.clone(), id.clone());
        tokio::spawn(self.clone().keep(key, caller.clone(), id));
        Ok(rx)
    }

    /// The caller's X509-SVID once there is one (or why there is none).
    pub(crate) async fn current(
        self: &Arc<Self>,
        caller: &wire::Caller,
        principal: Principal,
    ) -> Result<Arc<X509Svid>, wire::Error> {
        let mut rx = self.watch(caller, principal)?;
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
                    let refused = is_refusal(&e);
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
            // Until the renewal time, looking every CHECK (and at once when
            // evicted) whether the identity is still kept: an identity nobody
            // uses goes, its task and its key with it, within CHECK of that.
            let renew = tokio::time::Instant::now() + wait;
            loop {
                let next = renew.min(tokio::time::Instant::now() + CHECK);
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    () = id.evicted.notified() => {}
                }
                if !self.still_kept(&key, &id) {
                    tracing::debug!(uid = caller.uid, "SVID of an idle or evicted caller dropped");
                    return;
                }
                if tokio::time::Instant::now() >= renew {
                    break;
                }
            }
        }
    }

    /// Whether `id` is still to be renewed: it was not evicted meanwhile (the
    /// table was full and nobody watched it), and someone watches it or used
    /// it lately. A refusal nobody watches is not asked for again: the next
    /// call asks. An identity no longer kept leaves the table.
    fn still_kept(&self, key: &CallerKey, id: &Arc<Identity>) -> bool {
        let mut map = lock(&self.identities);
        if !map.get(key).is_some_and(|held| Arc::ptr_eq(held, id)) {
            return false;
        }
        let refused = matches!(&*id.state.borrow(), State::Refused(_));
        let idle = now() - id.used.load(std::sync::atomic::Ordering::Relaxed) > IDLE;
        if id.state.receiver_count() == 0 && (idle || refused) {
            map.remove(key);
            return false;
        }
        true
    }

    async fn obtain_x509(&self, caller: &wire::Caller) -> Result<X509Svid, wire::Error> {
        obtain_x509(&self.agent, &self.role, 0, caller).await
    }

    /// A JWT-SVID for the caller and `audience` (`spiffe_id` empty: its
    /// first ID), reused until its half-life.
    pub(crate) async fn jwt(
        &self,
        caller: &wire::Caller,
        principal: Principal,
        audience: Vec<String>,
        spiffe_id: String,
    ) -> Result<(String, String), wire::Error> {
        self.agent_allows(caller, Kind::JwtSvid)?;
        let mut aud = audience.clone();
        aud.sort();
        let key = (principal, CallerKey::of(caller), aud, spiffe_id.clone());
        match lock(&self.jwts).get(&key).filter(|c| c.fresh(now())) {
            Some(CachedJwt::Issued { spiffe_id, token, .. }) => return Ok((spiffe_id.clone(), token.clone())),
            Some(CachedJwt::Refused { error, .. }) => return Err(error.clone()),
            None => {}
        }
        self.spend(principal, caller.uid)?;
        let g = wire::GrantRequest {
            kind: Kind::JwtSvid.wire() as i32,
            role: self.role.clone(),
            audience,
            spiffe_id,
            caller: Some(caller.clone()),
            ..Default::default()
        };
        let granted = self.agent.grant(g).await;
        let start = now();
        let cached = match &granted {
            Ok(gr) => {
                let reuse_until = start + (gr.not_after_unix - start) / 2;
                CachedJwt::Issued { spiffe_id: gr.spiffe_id.clone(), token: gr.jwt_svid.clone(), reuse_until }
            }
            Err(e) if is_refusal(e) => {
                let until = start + i64::try_from(REFUSED_RETRY.as_secs()).unwrap_or(30);
                CachedJwt::Refused { error: e.clone(), until }
            }
            Err(e) => return Err(e.clone()),
        };
        if let Ok(gr) = &granted {
            check_receipt_names(gr).map_err(|e| {
                wire::Error::new(ErrorCode::Internal, format!("the broker's JWT-SVID was discarded: {e:#}"))
            })?;
        }
        cache_jwt(&mut lock(&self.jwts), key, cached, start);
        let gr = granted?;
        Ok((gr.spiffe_id, gr.jwt_svid))
    }
}

/// Whether the broker refused for good (policy, request, revocation), as
/// against being unreachable for now.
fn is_refusal(e: &wire::Error) -> bool {
    matches!(ErrorCode::try_from(e.code), Ok(ErrorCode::PermissionDenied | ErrorCode::BadRequest | ErrorCode::Revoked))
}

/// Makes room in a full identity table: drops the identity nobody watches
/// that was used longest ago. False if every one is watched (each watcher
/// holds a connection, so one uid can hold at most its connection share).
fn evict_unwatched(map: &mut HashMap<CallerKey, Arc<Identity>>) -> bool {
    let oldest = map
        .iter()
        .filter(|(_, id)| id.state.receiver_count() == 0)
        .min_by_key(|(_, id)| id.used.load(std::sync::atomic::Ordering::Relaxed))
        .map(|(k, _)| k.clone());
    match oldest.and_then(|k| map.remove(&k)) {
        Some(id) => {
            id.evicted.notify_one();
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(used: i64) -> (Arc<Identity>, watch::Receiver<State>) {
        let (tx, rx) = watch::channel(State::Pending);
        (Arc::new(Identity { state: tx, evicted: tokio::sync::Notify::new(), used: used.into() }), rx)
    }

    fn key(exe: &str) -> CallerKey {
        CallerKey { uid: 1000, gid: 1000, exe: exe.into(), unit: String::new() }
    }

    /// Review finding: callers that asked once and left held the table's
    /// 1,024 places for minutes, so every new workload was refused. A full
    /// table now gives way: the unwatched identity used longest ago goes.
    #[test]
    fn a_full_table_evicts_the_oldest_unwatched_identity_never_a_watched_one() {
        let mut map = HashMap::new();
        let (watched, _rx) = identity(1);
        map.insert(key("watched"), watched);
        let (old, rx) = identity(2);
        drop(rx);
        map.insert(key("old"), old);
        let (recent, rx) = identity(3);
        drop(rx);
        map.insert(key("recent"), recent);
        let old = map[&key("old")].clone();
        assert!(evict_unwatched(&mut map));
        assert!(!map.contains_key(&key("old")) && map.contains_key(&key("recent")));
        // Second review: its keeper slept until the half-life; now it is told.
        let told = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), old.evicted.notified()).await.is_ok() });
        assert!(told, "the evicted identity's keeper is woken");
        assert!(evict_unwatched(&mut map));
        assert!(!evict_unwatched(&mut map), "a watched identity is never evicted");
        assert!(map.contains_key(&key("watched")));
    }
}
