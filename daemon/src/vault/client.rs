//! The broker's connection to Vault: its own token (from a file or an AppRole
//! login), renewed at half its TTL, re-obtained when Vault refuses it; and one
//! place where every call gets a timeout, bounded retries and an error that
//! says whether retrying can help.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use grantline_proto::audit::event::vault_fingerprint;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::config::{VaultAuth, VaultConfig};
use super::endpoints::{RenewLease, RevokeLease};
use super::failure::{classify, in_context, Failure};
use crate::issuer::IssueError;

/// Attempts per idempotent call: one, and two retries for errors that can pass.
const ATTEMPTS: u32 = 3;

/// The least time between two logins forced by Vault refusing the broker's
/// token: a burst of refusals (or a node asking for a path the broker's
/// policy does not cover) never spends AppRole secret_id uses.
const RELOGIN_EVERY: Duration = Duration::from_secs(30);

/// How long the answer to a call sent once is still awaited after the
/// broker stopped waiting for it, so that what Vault created late is revoked.
pub const LATE_ANSWER_WINDOW: Duration = Duration::from_secs(120);

/// Calls whose late answers are awaited at once; beyond this (Vault hanging
/// under load) a late request is abandoned, and logged as such.
const MAX_LATE_ANSWERS: usize = 256;

/// Whether a call may be sent again after a failure that might have come
/// after Vault acted on it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Retry {
    /// Signing, reading, revoking: sending it twice does no harm.
    Idempotent,
    /// Creating a token or reading a dynamic secret: each attempt may mint a
    /// credential, so it is sent once and a timeout is reported as one.
    Once,
}

pub struct Vault {
    pub(super) config: VaultConfig,
    client: RwLock<Arc<VaultClient>>,
    /// Serializes logins so a burst of 403s logs in once.
    login_lock: tokio::sync::Mutex<()>,
    /// When a refusal last made the broker log in again.
    relogged_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// Bounds the requests awaited after their caller gave up.
    late_answers: Arc<Semaphore>,
    /// Those requests, so a stopping broker can wait for them.
    late_tasks: TaskTracker,
    /// When the broker last tried to log in, so requests arriving while it
    /// is logged out do not each spend an AppRole secret_id use.
    login_tried_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// A credential Vault minted, named so it can be revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Minted {
    Token { accessor: String },
    Lease { lease_id: String },
}

/// A minting request still in flight. Dropped before its answer (timeout,
/// or the caller went away), it hands the request to a task that awaits
/// the answer and revokes what it names.
struct LateAnswer<T: Send + 'static> {
    task: Option<JoinHandle<Result<T, ClientError>>>,
    vault: Arc<Vault>,
    what: &'static str,
    minted: fn(&T) -> Option<Minted>,
}

impl<T: Send + 'static> Drop for LateAnswer<T> {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        let (Ok(runtime), Ok(permit)) =
            (tokio::runtime::Handle::try_current(), self.vault.late_answers.clone().try_acquire_owned())
        else {
            task.abort();
            tracing::error!(
                what = self.what,
                "too many Vault requests are awaited after their timeout; abandoning one (what Vault created for \
                 it, if anything, lives until its Vault TTL)"
            );
            return;
        };
        let (vault, what, minted) = (self.vault.clone(), self.what, self.minted);
        runtime.spawn(self.vault.late_tasks.track_future(async move {
            let _permit = permit;
            if let Ok(Ok(answer)) = task.await {
                if let Some(m) = minted(&answer) {
                    vault.withdraw(&m, what).await;
                }
            }
        }));
    }
}

impl Vault {
    /// Builds the client. Logging in happens on first use and in the renewal
    /// task, so a broker starts (and serves embedded kinds) while Vault is down.
    pub fn new(config: VaultConfig) -> Result<Arc<Self>> {
        let client = build_client(&config, "")?;
        Ok(Arc::new(Self {
            config,
            client: RwLock::new(Arc::new(client)),
            login_lock: tokio::sync::Mutex::new(()),
            relogged_at: std::sync::Mutex::new(None),
            late_answers: Arc::new(Semaphore::new(MAX_LATE_ANSWERS)),
            late_tasks: TaskTracker::new(),
            login_tried_at: std::sync::Mutex::new(None),
        }))
    }

    fn client(&self) -> Arc<VaultClient> {
        self.client.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn has_token(&self) -> bool {
        !self.client().settings.token.is_empty()
    }

    /// Logs in unless another task did while this one waited, or a login
    /// was tried less than [`RELOGIN_EVERY`] ago (the token task keeps
    /// trying, with backoff): a burst of requests while Vault is slow must
    /// not spend a secret_id use each.
    async fn ensure_logged_in(&self) -> Result<(), IssueError> {
        let _guard = self.login_lock.lock().await;
        if self.has_token() {
            return Ok(());
        }
        let tried = *self.login_tried_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(at) = tried.filter(|t| t.elapsed() < RELOGIN_EVERY) {
            return Err(IssueError::Unavailable(format!(
                "the broker is not logged in to Vault (its last login, {}s ago, failed); it keeps trying",
                at.elapsed().as_secs()
            )));
        }
        self.login_locked().await.map(|_| ())
    }

    /// Waits up to `limit` for the late answers still awaited (a stopping
    /// broker), so what they created is revoked; says how many it left.
    pub async fn drain(&self, limit: Duration) {
        self.late_tasks.close();
        if tokio::time::timeout(limit, self.late_tasks.wait()).await.is_err() {
            tracing::error!(
                left = self.late_tasks.len(),
                "stopping with Vault requests still unanswered; what Vault creates for them lives until its TTL"
            );
        }
    }

    /// Obtains a fresh token; returns its TTL (zero: it does not expire).
    pub async fn login(&self) -> Result<Duration, IssueError> {
        let _guard = self.login_lock.lock().await;
        self.login_locked().await
    }

    async fn login_locked(&self) -> Result<Duration, IssueError> {
        *self.login_tried_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(std::time::Instant::now());
        let (token, ttl) = match &self.config.auth {
            VaultAuth::Token { file } => {
                let token = grantline_proto::files::read_secret(file)
                    .map_err(|e| IssueError::Internal(format!("cannot read the Vault token file: {e}")))?
                    .trim()
                    .to_owned();
                let probe = build_client(&self.config, &token).map_err(|e| IssueError::Internal(format!("{e:#}")))?;
                let info = self.timed(vaultrs::token::lookup_self(&probe)).await?;
                (token, Duration::from_secs(info.ttl))
            }
            VaultAuth::AppRole { mount, role_id, secret_id_file } => {
                let secret_id = grantline_proto::files::read_secret(secret_id_file)
                    .map_err(|e| IssueError::Internal(format!("cannot read the AppRole secret_id file: {e}")))?
                    .trim()
                    .to_owned();
                let anon = self.client();
                let auth = self.timed(vaultrs::auth::approle::login(&*anon, mount, role_id, &secret_id)).await?;
                (auth.client_token, Duration::from_secs(auth.lease_duration))
            }
        };
        let client = build_client(&self.config, &token).map_err(|e| IssueError::Internal(format!("{e:#}")))?;
        *self.client.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(client);
        tracing::info!(ttl_s = ttl.as_secs(), "logged in to Vault");
        Ok(ttl)
    }

    async fn attempt<T>(&self, fut: impl Future<Output = Result<T, ClientError>>) -> Result<T, Failure> {
        match tokio::time::timeout(self.config.timeout, fut).await {
            Err(_) => Err(Failure::Timeout(self.config.timeout)),
            Ok(r) => r.map_err(Failure::Vault),
        }
    }

    async fn timed<T>(&self, fut: impl Future<Output = Result<T, ClientError>>) -> Result<T, IssueError> {
        self.attempt(fut).await.map_err(classify)
    }

    /// Runs a call that cannot mint anything (signing, reading, revoking)
    /// against Vault: logs in first if needed, retries what can pass
    /// (connection errors, timeouts, 5xx, sealed) with backoff, and handles
    /// a refusal (403) by asking Vault whether the broker's own token is
    /// still good: only then does it log in again.
    pub async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, IssueError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        self.drive(what, Retry::Idempotent, |c| self.attempt(op(c))).await
    }

    /// Runs a call that may mint a credential (creating a token, reading a
    /// dynamic secret). It is sent once. If Vault has not answered within the
    /// timeout, the caller is told so, and the request goes on waiting in the
    /// background for up to [`LATE_ANSWER_WINDOW`]: whatever Vault created,
    /// named by `minted`, is then revoked, never left to its Vault TTL. The
    /// same happens if the calling task is cancelled while it waits.
    pub async fn call_minting<T, F, Fut>(
        self: &Arc<Self>,
        what: &'static str,
        op: F,
        minted: fn(&T) -> Option<Minted>,
    ) -> Result<T, IssueError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>> + Send + 'static,
        T: Send + 'static,
    {
        self.drive(what, Retry::Once, |c| self.attempt_withdrawing_late(what, op(c), minted)).await
    }

    async fn attempt_withdrawing_late<T: Send + 'static>(
        self: &Arc<Self>,
        what: &'static str,
        fut: impl Future<Output = Result<T, ClientError>> + Send + 'static,
        minted: fn(&T) -> Option<Minted>,
    ) -> Result<T, Failure> {
        let mut pending = LateAnswer { task: Some(tokio::spawn(fut)), vault: self.clone(), what, minted };
        let task = pending.task.as_mut().unwrap_or_else(|| unreachable!("just set"));
        match tokio::time::timeout(self.config.timeout, task).await {
            // Dropping `pending` hands the request to a withdrawing task.
            Err(_) => Err(Failure::Timeout(self.config.timeout)),
            Ok(joined) => {
                pending.task = None;
                match joined {
                    Ok(r) => r.map_err(Failure::Vault),
                    Err(e) => Err(Failure::Lost(e.to_string())),
                }
            }
        }
    }

    /// The loop shared by both kinds of call: login, the 403 rule, and
    /// retries where `retry` allows them.
    async fn drive<T, S, Fut>(&self, what: &str, retry: Retry, send: S) -> Result<T, IssueError>
    where
        S: Fn(Arc<VaultClient>) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        if !self.has_token() {
            self.ensure_logged_in().await.map_err(|e| in_context("logging in to Vault", e))?;
        }
        let mut relogged = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client = self.client();
            let failure = match send(client.clone()).await {
                Ok(v) => return Ok(v),
                Err(f) => f,
            };
            match failure {
                // A refusal: Vault did nothing, so sending again is safe.
                Failure::Vault(ClientError::APIError { code: 403, errors }) if !relogged => {
                    relogged = true;
                    if !self.relogin_if_token_invalid(what, &client).await? {
                        metrics::counter!("grantline_vault_errors_total", "op" => what.to_owned()).increment(1);
                        return Err(IssueError::Internal(format!(
                            "{what}: Vault refused it (403: {}) although the broker's token is valid: the broker's \
                             Vault policy does not allow this path; extend that policy or the node's broker policy",
                            errors.join("; ")
                        )));
                    }
                }
                Failure::Timeout(t) if retry == Retry::Once => {
                    metrics::counter!("grantline_vault_errors_total", "op" => what.to_owned()).increment(1);
                    return Err(IssueError::Unavailable(format!(
                        "{what}: Vault did not answer within {t:?}; not sent again, since Vault may have acted on \
                         it: the broker revokes whatever Vault answers within the next {}s (unless it already \
                         awaits {MAX_LATE_ANSWERS} late answers: then that is logged)",
                        LATE_ANSWER_WINDOW.as_secs()
                    )));
                }
                f => match classify(f) {
                    IssueError::Unavailable(_) if retry == Retry::Idempotent && attempt < ATTEMPTS => {
                        tokio::time::sleep(Duration::from_millis(100 * 4u64.pow(attempt - 1))).await;
                    }
                    e => {
                        metrics::counter!("grantline_vault_errors_total", "op" => what.to_owned()).increment(1);
                        return Err(in_context(what, e));
                    }
                },
            }
        }
    }

    /// Revokes a credential Vault minted that no node will ever receive.
    pub async fn withdraw(&self, minted: &Minted, what: &str) {
        let (result, fingerprint) = match minted {
            Minted::Token { accessor } => {
                (self.revoke_accessor(accessor).await, vault_fingerprint("token-accessor", accessor))
            }
            Minted::Lease { lease_id } => (self.revoke_lease(lease_id).await, vault_fingerprint("lease", lease_id)),
        };
        match result {
            Ok(()) => {
                metrics::counter!("grantline_vault_withdrawn_total", "op" => what.to_owned()).increment(1);
                tracing::warn!(what, %fingerprint, "revoked a Vault credential that was never delivered");
            }
            Err(e) => tracing::error!(
                what, %fingerprint, error = %e,
                "cannot revoke a Vault credential that was never delivered; it lives until its Vault TTL"
            ),
        }
    }

    /// After a 403: logs in again only if Vault says the broker's own token
    /// is no longer valid, at most once per [`RELOGIN_EVERY`], and revokes
    /// the token it replaces. Whether it logged in.
    async fn relogin_if_token_invalid(&self, what: &str, refused: &Arc<VaultClient>) -> Result<bool, IssueError> {
        let old = self.client();
        if !Arc::ptr_eq(&old, refused) {
            // Another task logged in since: try again with its token.
            return Ok(true);
        }
        match self.attempt(vaultrs::token::lookup_self(&*old)).await {
            Ok(_) => return Ok(false),
            Err(Failure::Vault(ClientError::APIError { code: 403, .. })) => {}
            Err(f) => return Err(in_context("checking the broker's Vault token", classify(f))),
        }
        {
            let mut at = self.relogged_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if at.is_some_and(|t| t.elapsed() < RELOGIN_EVERY) {
                return Err(IssueError::Unavailable(format!(
                    "{what}: Vault no longer accepts the broker's token and the broker logged in again less than \
                     {RELOGIN_EVERY:?} ago; retry later"
                )));
            }
            *at = Some(std::time::Instant::now());
        }
        tracing::info!(what, "Vault no longer accepts the broker's token; logging in again");
        self.login().await.map_err(|e| in_context("logging in to Vault", e))?;
        // The replaced token is useless to us; it should not outlive its use
        // (it may already be gone, which is fine).
        if !old.settings.token.is_empty() {
            let _ = self.attempt(vaultrs::token::revoke_self(&*old)).await;
        }
        Ok(true)
    }

    /// Keeps the broker's token alive: renews it at half its TTL, logs in
    /// again when renewal fails, and retries with backoff while Vault is down.
    pub async fn maintain_token(self: Arc<Self>) {
        let mut ttl = match self.login().await {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "cannot log in to Vault yet; Vault kinds are unavailable until it answers");
                None
            }
        };
        let mut failures = 0u32;
        loop {
            let wait = match ttl {
                Some(t) if t.is_zero() => return, // a token that never expires
                Some(t) => t / 2,
                None => Duration::from_millis(500 * 2u64.pow(failures.min(6))),
            };
            tokio::time::sleep(wait).await;
            let renewed = match ttl {
                Some(_) => self
                    .timed(vaultrs::token::renew_self(&*self.client(), None))
                    .await
                    .map(|a| Duration::from_secs(a.lease_duration)),
                None => Err(IssueError::Unavailable("not logged in".into())),
            };
            ttl = match renewed {
                Ok(t) => Some(t),
                Err(_) => match self.login().await {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::warn!(error = %e, "Vault login failed; retrying");
                        None
                    }
                },
            };
            failures = if ttl.is_some() { 0 } else { failures + 1 };
        }
    }

    pub async fn revoke_lease(&self, lease_id: &str) -> Result<(), IssueError> {
        self.call("revoking a lease", |c| {
            let e = RevokeLease { lease_id: lease_id.to_owned() };
            async move { vaultrs::api::exec_with_empty(&*c, e).await }
        })
        .await
    }

    /// Sets a lease's TTL to `increment` from now; returns the TTL Vault granted.
    pub async fn renew_lease(&self, lease_id: &str, increment: Duration) -> Result<Duration, IssueError> {
        let r = self
            .call("capping a lease", |c| {
                let e = RenewLease { lease_id: lease_id.to_owned(), increment_secs: increment.as_secs() };
                async move { vaultrs::api::exec_with_no_result(&*c, e).await }
            })
            .await?;
        Ok(Duration::from_secs(u64::from(r.lease_duration)))
    }

    pub async fn revoke_accessor(&self, accessor: &str) -> Result<(), IssueError> {
        self.call("revoking a token", |c| async move { vaultrs::token::revoke_accessor(&*c, accessor).await }).await
    }
}

fn build_client(config: &VaultConfig, token: &str) -> Result<VaultClient> {
    let mut b = VaultClientSettingsBuilder::default();
    // Each call's own deadline is `config.timeout` (see `attempt`); the
    // HTTP client's is the longer window in which a minting call's late
    // answer is still read, so what it created can be revoked.
    b.address(&config.address).token(token).timeout(Some(config.timeout.max(LATE_ANSWER_WINDOW)));
    if let Some(ca) = &config.ca_file {
        b.ca_certs(vec![ca.display().to_string()]);
    }
    let settings = b.build().context("invalid Vault client settings")?;
    VaultClient::new(settings).context("cannot build the Vault client")
}
