//! How a broker reaches PostgreSQL: `[state] url`, a password from a file
//! or the URL, TLS through rustls when a CA file is given or the URL asks
//! for it, and a pool sized by configuration.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio_postgres::config::SslMode;

/// `[state]` when it names PostgreSQL.
#[derive(Clone)]
pub struct PgConfig {
    /// `postgres://user[:password]@host[:port]/db[?sslmode=…]`; never logged.
    pub url: String,
    /// Read at start (0600 is expected); takes the place of a password in the URL.
    pub password_file: Option<PathBuf>,
    /// PEM roots the server's certificate must chain to; asks for TLS.
    pub ca_file: Option<PathBuf>,
    pub pool_size: usize,
    /// How long grants go on from the cached node records while the change
    /// feed is down (RFD 0010, "PostgreSQL unavailable").
    pub max_staleness: Duration,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &redacted(&self.url))
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("max_staleness", &self.max_staleness)
            .finish()
    }
}

/// The URL with any password replaced, for logs and errors.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            // libpq also takes the password as a query parameter.
            if u.query_pairs().any(|(k, _)| k == "password") {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| (k.to_string(), if k == "password" { "***".into() } else { v.to_string() }))
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "(unparsable URL)".into(),
    }
}

/// `[state]` of `grantlined.toml`: without a `url`, the broker's own
/// SQLite `state.db`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// `postgres://…`: the fleet's shared state (RFD 0010).
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// Connections in the pool; default 16.
    pub pool_size: Option<usize>,
    /// How long grants go on while PostgreSQL is unreachable; default "30s".
    pub max_staleness: Option<String>,
}

impl StateFile {
    /// The PostgreSQL configuration, or None for SQLite; checked.
    pub fn config(self) -> Result<Option<PgConfig>> {
        let Some(url) = self.url else {
            if self.password_file.is_some() || self.ca_file.is_some() || self.pool_size.is_some() {
                bail!("[state] sets PostgreSQL options without a url; add url = \"postgres://…\" or remove them");
            }
            return Ok(None);
        };
        let max_staleness = match self.max_staleness.as_deref() {
            Some(s) => humantime::parse_duration(s)
                .with_context(|| format!("[state] max_staleness {s:?} is not a duration like \"30s\""))?,
            None => DEFAULT_MAX_STALENESS,
        };
        if max_staleness < Duration::from_secs(2) || max_staleness > Duration::from_secs(3600) {
            bail!("[state] max_staleness must be between 2 s and 1 h: it is how long a revocation at another broker may go unseen");
        }
        let cfg = PgConfig {
            url,
            password_file: self.password_file,
            ca_file: self.ca_file,
            pool_size: self.pool_size.unwrap_or(DEFAULT_POOL_SIZE),
            max_staleness,
        };
        cfg.target()?;
        Ok(Some(cfg))
    }
}

pub const DEFAULT_POOL_SIZE: usize = 16;
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(30);
/// The largest pool a broker opens (PostgreSQL's default max_connections is 100).
pub const MAX_POOL_SIZE: usize = 256;

/// A validated client configuration and its TLS connector.
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: Tls,
    /// `host:port/db` for messages.
    pub name: String,
}

#[derive(Clone)]
pub enum Tls {
    Plain,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl PgConfig {
    /// Checks the configuration and reads the password and CA files; says
    /// what to fix when something is wrong.
    pub fn target(&self) -> Result<Target> {
        if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) {
            bail!("[state] url must be a postgres:// URL (got {})", redacted(&self.url));
        }
        let mut config = tokio_postgres::Config::from_str(&self.url)
            .map_err(|e| anyhow::anyhow!("[state] url {} is not a PostgreSQL URL: {e}", redacted(&self.url)))?;
        if config.get_hosts().is_empty() {
            bail!("[state] url {} names no host", redacted(&self.url));
        }
        if let Some(path) = &self.password_file {
            let secret = grantline_proto::files::read_secret(path)
                .with_context(|| format!("cannot read [state] password_file {}", path.display()))?;
            config.password(secret.trim_end_matches(['\n', '\r']));
        }
        config.application_name("grantlined");
        config.connect_timeout(Duration::from_secs(5));
        config.keepalives_idle(Duration::from_secs(10));
        let wants_tls = matches!(config.get_ssl_mode(), SslMode::Require) || self.ca_file.is_some();
        let tls = match &self.ca_file {
            Some(ca) => {
                let pem = grantline_proto::files::read_bounded(ca, grantline_proto::files::MAX_SECRET_FILE)
                    .with_context(|| format!("cannot read [state] ca_file {}", ca.display()))?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
                    roots.add(cert.with_context(|| format!("{} holds a malformed certificate", ca.display()))?)?;
                }
                if roots.is_empty() {
                    bail!("[state] ca_file {} holds no certificate", ca.display());
                }
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                config.ssl_mode(SslMode::Require);
                Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
            }
            None if wants_tls => {
                bail!("[state] url asks for TLS (sslmode=require): set [state] ca_file to the PEM CA that signed the server's certificate")
            }
            None => {
                // Without a CA file the connection is in the clear; libpq's
                // default "prefer" would silently fall back anyway.
                config.ssl_mode(SslMode::Disable);
                Tls::Plain
            }
        };
        if self.pool_size == 0 || self.pool_size > MAX_POOL_SIZE {
            bail!("[state] pool_size must be between 1 and {MAX_POOL_SIZE} (got {})", self.pool_size);
        }
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let name = format!("{host}:{port}/{}", config.get_dbname().unwrap_or(""));
        Ok(Target { config, tls, name })
    }
}

impl Target {
    /// One connection outside the pool (the change feed's), with the task
    /// that drives it.
    pub async fn connect(&self) -> Result<(tokio_postgres::Client, Driver)> {
        let connect = async {
            match &self.tls {
                Tls::Plain => {
                    let (client, conn) = self.config.connect(tokio_postgres::NoTls).await?;
                    Ok::<_, tokio_postgres::Error>((client, Driver::spawn(conn)))
                }
                Tls::Rustls(tls) => {
                    let (client, conn) = self.config.connect(tls.clone()).await?;
                    Ok((client, Driver::spawn(conn)))
                }
            }
        };
        connect.await.with_context(|| format!("cannot connect to PostgreSQL at {}", self.name))
    }

    pub fn pool(&self, size: usize) -> Result<deadpool_postgres::Pool> {
        let manager_config =
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast };
        let manager = match &self.tls {
            Tls::Plain => {
                deadpool_postgres::Manager::from_config(self.config.clone(), tokio_postgres::NoTls, manager_config)
            }
            Tls::Rustls(tls) => {
                deadpool_postgres::Manager::from_config(self.config.clone(), tls.clone(), manager_config)
            }
        };
        Ok(deadpool_postgres::Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()?)
    }
}

/// The channels the change feed's heartbeats come back on start with this
/// (the rest is random per connection).
pub(super) const BEAT_PREFIX: &str = "grantline_beat_";

/// Drives a connection and hands its notifications on; the channel closes
/// when the connection ends.
pub struct Driver {
    pub notifications: tokio::sync::mpsc::Receiver<tokio_postgres::Notification>,
    /// Set when a notification was dropped (the channel was full).
    pub overflowed: Arc<std::sync::atomic::AtomicBool>,
    /// The highest heartbeat number that came back (heartbeats bypass the
    /// channel, so they are never dropped).
    pub beat: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Driver {
    fn spawn<S, T>(mut conn: tokio_postgres::Connection<S, T>) -> Self
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
    {
        // Bounded: past 64 pending, notifications are dropped and the feed
        // told to reload every record instead.
        let (tx, notifications) = tokio::sync::mpsc::channel(64);
        let overflowed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = overflowed.clone();
        let beat = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let returned = beat.clone();
        let task = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) if n.channel().starts_with(BEAT_PREFIX) => {
                        if let Ok(number) = n.payload().parse::<u64>() {
                            returned.fetch_max(number, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                        match tx.try_send(n) {
                            Ok(()) => {}
                            // The feed reloads everything when it sees this.
                            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "the PostgreSQL change-feed connection failed");
                        return;
                    }
                    None => return,
                }
            }
        });
        Self { notifications, overflowed, beat, task }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(url: &str) -> StateFile {
        StateFile { url: Some(url.into()), ..Default::default() }
    }

    #[test]
    fn bad_state_sections_say_what_to_fix_and_never_show_the_password() {
        let err = |f: StateFile| f.config().err().map(|e| format!("{e:#}")).unwrap_or_default();
        let e = err(StateFile { pool_size: Some(4), ..Default::default() });
        assert!(e.contains("without a url"), "{e}");
        let e = err(file("mysql://u:hunter2@db/x"));
        assert!(e.contains("postgres://") && !e.contains("hunter2"), "{e}");
        let e = err(file("postgres://u:hunter2@db/x?sslmode=require"));
        assert!(e.contains("ca_file") && !e.contains("hunter2"), "{e}");
        let e = err(StateFile { pool_size: Some(0), ..file("postgres://u@db/x") });
        assert!(e.contains("pool_size"), "{e}");
        let e = err(StateFile { max_staleness: Some("1s".into()), ..file("postgres://u@db/x") });
        assert!(e.contains("max_staleness"), "{e}");
        let e = err(StateFile { password_file: Some("/nonexistent/pw".into()), ..file("postgres://u@db/x") });
        assert!(e.contains("password_file"), "{e}");
        assert_eq!(StateFile::default().config().unwrap().map(|c| c.url), None, "no url: SQLite as before");
        assert!(!redacted("postgres://u@db/x?password=hunter2&sslmode=disable").contains("hunter2"));
        let cfg = file("postgres://u:hunter2@db:5433/x").config().unwrap().unwrap();
        assert!(!format!("{cfg:?}").contains("hunter2"), "the password reached a Debug print");
        assert_eq!(cfg.target().unwrap().name, "db:5433/x");
    }
}
