//! Broker configuration: `/etc/grantline/grantlined.toml` in production, or the
//! embedded defaults of `grantlined dev`. Everything is validated here, before
//! any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::server::admission::Limits;
use crate::server::{load_policy, BrokerOptions};

pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
pub const DEFAULT_DEV_LISTEN: &str = "127.0.0.1:7443";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/grantline";
pub const DEFAULT_POLICY: &str = "/etc/grantline/policy.toml";
use grantline_proto::admin_file::{AdminFile, MAX_CONFIG_FILE};
pub const DEFAULT_METRICS: &str = "127.0.0.1:9464";
/// The trust domain of `grantlined dev`.
pub const DEV_TRUST_DOMAIN: &str = "grantline.dev";

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// Default true.
    pub enabled: Option<bool>,
    /// A loopback address, default 127.0.0.1:9464.
    pub listen: Option<String>,
}

/// `[limits]`: admission control on handshakes (RFD 0008).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Handshakes in flight at which new connections are refused; default 4096.
    pub max_handshakes: Option<usize>,
    /// Handshakes in flight above which senders must answer a QUIC retry
    /// first; default 256.
    pub retry_handshakes_above: Option<usize>,
    /// The reconnection rate a restart asks agents to keep to, by spreading
    /// their reconnects; default 2000 per second.
    pub reconnects_per_second: Option<usize>,
}

/// `[spiffe]`: the trust domain whose SVIDs the broker signs (RFD 0011).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpiffeFile {
    /// E.g. "example.org"; SPIFFE IDs are `spiffe://<trust_domain>/…`.
    pub trust_domain: String,
    pub oidc: Option<OidcFile>,
}

/// `[spiffe.oidc]`: the OIDC discovery document and JWKS over HTTPS.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcFile {
    /// TCP address to serve HTTPS on, e.g. "0.0.0.0:443".
    pub listen: String,
    /// The issuer URL relying parties are configured with (`https://…`); the
    /// `iss` claim of every JWT-SVID.
    pub issuer: String,
    /// The HTTPS certificate chain and key (PEM). Without them the broker
    /// issues one from its own root for the issuer's host, which only
    /// parties trusting that root accept (no cloud provider does).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

fn spiffe_options(file: Option<SpiffeFile>) -> Result<Option<crate::server::SpiffeOptions>> {
    let Some(file) = file else { return Ok(None) };
    crate::spiffe::check_trust_domain(&file.trust_domain)?;
    let oidc = match file.oidc {
        None => None,
        Some(o) => {
            let listen: SocketAddr =
                o.listen.parse().with_context(|| format!("[spiffe.oidc] listen {:?} is not IP:PORT", o.listen))?;
            let tls = match (o.tls_cert_file, o.tls_key_file) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => bail!("[spiffe.oidc]: give both tls_cert_file and tls_key_file, or neither"),
            };
            Some(crate::server::OidcOptions { listen, issuer: Some(check_issuer(&o.issuer)?), tls })
        }
    };
    Ok(Some(crate::server::SpiffeOptions { trust_domain: file.trust_domain, oidc }))
}

/// An OIDC issuer URL: `https://host[:port][/path]`, no query or fragment.
fn check_issuer(issuer: &str) -> Result<String> {
    let url = url::Url::parse(issuer).with_context(|| format!("[spiffe.oidc] issuer {issuer:?} is not a URL"))?;
    if url.scheme() != "https" || url.host_str().is_none() || url.query().is_some() || url.fragment().is_some() {
        bail!("[spiffe.oidc] issuer {issuer:?} must be an https:// URL without query or fragment (OIDC Discovery 1.0)");
    }
    Ok(issuer.trim_end_matches('/').to_owned())
}

/// `grantlined.toml`. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// UDP address of the QUIC listener.
    pub listen: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub policy: Option<PathBuf>,
    /// The audit log's origin, fixed when the log is created.
    pub origin: Option<String>,
    /// Names (DNS or IP) agents use to reach the broker; they go into its
    /// server certificate.
    pub server_names: Option<Vec<String>>,
    /// Lifetime of node identity certificates; agents renew at half of it.
    pub node_identity_ttl: Option<String>,
    /// Vault/OpenBao as a credential source (RFD 0004).
    pub vault: Option<crate::vault::config::VaultFile>,
    /// Where the log is published in the C2SP tlog-tiles layout: a directory,
    /// or a `file://`, `s3://`, `gs://` or `az://` URL. Default: `<state_dir>/anchor`.
    pub anchor: Option<String>,
    /// A 0600 file of object-store options (`AWS_ACCESS_KEY_ID=…`), beside
    /// those in grantlined's environment.
    pub anchor_options_file: Option<PathBuf>,
    /// Let a cloud anchor take credentials from the machine's metadata
    /// service (otherwise one without credentials is refused).
    pub anchor_instance_credentials: Option<bool>,
    /// How often an unchanged checkpoint is written again (default 1m, at
    /// most 5m: half of `verify-fleet`'s default `--max-age`).
    pub anchor_heartbeat: Option<String>,
    pub admin: Option<AdminFile>,
    pub metrics: Option<MetricsFile>,
    pub limits: Option<LimitsFile>,
    /// Where join tokens, nodes and leases live: PostgreSQL for a fleet.
    pub state: Option<crate::state::StateFile>,
    pub spiffe: Option<SpiffeFile>,
}

/// The longest `anchor_heartbeat`: half of `verify-fleet --max-age`'s
/// default, so that an idle broker is never reported as stopped.
const MAX_ANCHOR_HEARTBEAT: Duration = Duration::from_secs(300);

fn admin_options(file: Option<AdminFile>) -> Result<Option<crate::server::AdminOptions>> {
    let file = file.unwrap_or_default();
    if !file.enabled() {
        return Ok(None);
    }
    Ok(Some(crate::server::AdminOptions {
        socket: file.socket(),
        group: file.group(),
        mode: file.mode().map_err(anyhow::Error::msg)?,
    }))
}

/// Admission limits; each must be at least 1.
pub fn limits(file: LimitsFile) -> Result<Limits> {
    let default = Limits::default();
    let max_handshakes = file.max_handshakes.unwrap_or(default.max_handshakes);
    let retry_above = file.retry_handshakes_above.unwrap_or(default.retry_above);
    let reconnects_per_second = file.reconnects_per_second.unwrap_or(default.reconnects_per_second);
    if max_handshakes == 0 {
        bail!("limits.max_handshakes must be at least 1 (0 would refuse every agent)");
    }
    if retry_above == 0 {
        bail!("limits.retry_handshakes_above must be at least 1 (0 would send every agent a retry)");
    }
    if reconnects_per_second == 0 {
        bail!("limits.reconnects_per_second must be at least 1");
    }
    Ok(Limits { max_handshakes, retry_above, reconnects_per_second })
}

fn metrics_options(file: Option<MetricsFile>) -> Result<Option<SocketAddr>> {
    let file = file.unwrap_or_default();
    if file.enabled == Some(false) {
        return Ok(None);
    }
    let listen = file.listen.as_deref().unwrap_or(DEFAULT_METRICS);
    let addr: SocketAddr =
        listen.parse().with_context(|| format!("metrics.listen {listen:?} is not IP:PORT, e.g. {DEFAULT_METRICS}"))?;
    if !addr.ip().is_loopback() {
        bail!("metrics.listen {addr} must be a loopback address: the endpoint has no authentication");
    }
    Ok(Some(addr))
}

pub fn load(path: &Path) -> Result<BrokerOptions> {
    let text = grantline_proto::files::read_bounded(path, MAX_CONFIG_FILE)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let file: ConfigFile =
        toml::from_str(&text).with_context(|| format!("config file {} is invalid", path.display()))?;
    options(file).with_context(|| format!("config file {} is invalid", path.display()))
}

pub fn options(file: ConfigFile) -> Result<BrokerOptions> {
    let listen = parse_listen(file.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
    let host = hostname();
    let identity_ttl = match file.node_identity_ttl.as_deref() {
        Some(s) => humantime::parse_duration(s)
            .with_context(|| format!("node_identity_ttl {s:?} is not a duration like \"24h\""))?,
        None => Duration::from_secs(24 * 3600),
    };
    if identity_ttl < Duration::from_secs(120) || identity_ttl > Duration::from_secs(30 * 24 * 3600) {
        bail!("node_identity_ttl must be between 2 minutes and 30 days");
    }
    let origin = file.origin.unwrap_or_else(|| format!("grantline/{host}"));
    grantline_proto::audit::key::check_origin(&origin).context("origin")?;
    let server_names = file.server_names.unwrap_or_else(|| default_server_names(&host));
    for n in &server_names {
        crate::pki::parse_san(n).map_err(|e| anyhow::anyhow!("server_names: {e}"))?;
    }
    let vault = file.vault.map(crate::vault::VaultConfig::from_file).transpose()?;
    let policy_path = file.policy.unwrap_or_else(|| DEFAULT_POLICY.into());
    let state_dir: std::path::PathBuf = file.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into());
    let heartbeat = match &file.anchor_heartbeat {
        None => crate::server::DEFAULT_ANCHOR_HEARTBEAT,
        Some(s) => humantime::parse_duration(s)
            .ok()
            .filter(|d| (Duration::from_secs(1)..=MAX_ANCHOR_HEARTBEAT).contains(d))
            .with_context(|| format!("anchor_heartbeat {s:?} is not a duration from 1s to 5m"))?,
    };
    let anchor = Some(crate::server::AnchorOptions {
        location: file.anchor.unwrap_or_else(|| state_dir.join("anchor").display().to_string()),
        access: crate::audit::anchor::Access {
            instance_credentials: file.anchor_instance_credentials.unwrap_or(false),
            options_file: file.anchor_options_file,
        },
        heartbeat,
    });
    if let Some(a) = &anchor {
        crate::audit::anchor::check(&a.location, &a.access)?;
    }
    Ok(BrokerOptions {
        admin: admin_options(file.admin)?,
        metrics: metrics_options(file.metrics)?,
        limits: limits(file.limits.unwrap_or_default())?,
        listen,
        state_dir,
        anchor,
        policy: load_policy(&policy_path)?,
        policy_path,
        origin,
        server_names,
        identity_ttl,
        vault,
        database: file.state.unwrap_or_default().config()?,
        spiffe: spiffe_options(file.spiffe)?,
    })
}

/// The embedded defaults of `grantlined dev`.
/// Creates a dev broker's state directory (0700) with its anchor directory
/// and, unless one is there, the permissive dev policy.
pub fn prepare_dev_dir(state_dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    std::fs::create_dir_all(state_dir.join("anchor"))?;
    let policy = state_dir.join("policy.toml");
    if !policy.exists() {
        std::fs::write(&policy, crate::policy::DEV_POLICY)
            .with_context(|| format!("cannot write {}", policy.display()))?;
    }
    Ok(())
}

/// A dev broker's options (`grantlined dev`) for a state directory that
/// `prepare_dev_dir` made.
pub fn dev_options(state_dir: &Path, listen: &str, oidc_listen: &str, identity_ttl: Duration) -> Result<BrokerOptions> {
    if identity_ttl < Duration::from_secs(10) {
        bail!("--node-identity-ttl must be at least 10s");
    }
    let host = hostname();
    Ok(BrokerOptions {
        listen: parse_listen(listen)?,
        state_dir: state_dir.to_owned(),
        policy: load_policy(&state_dir.join("policy.toml"))?,
        policy_path: state_dir.join("policy.toml"),
        origin: format!("grantline-dev/{host}"),
        server_names: default_server_names(&host),
        identity_ttl,
        vault: None,
        anchor: Some(crate::server::AnchorOptions::directory(&state_dir.join("anchor"))),
        admin: Some(crate::server::AdminOptions { socket: state_dir.join("admin.sock"), group: None, mode: 0o600 }),
        metrics: None,
        limits: Limits::default(),
        database: None,
        spiffe: Some(crate::server::SpiffeOptions {
            trust_domain: DEV_TRUST_DOMAIN.into(),
            oidc: Some(crate::server::OidcOptions { listen: parse_listen(oidc_listen)?, issuer: None, tls: None }),
        }),
    })
}

fn parse_listen(s: &str) -> Result<SocketAddr> {
    s.parse().with_context(|| format!("listen address {s:?} is not IP:PORT, e.g. 127.0.0.1:7443"))
}

fn default_server_names(host: &str) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    if crate::pki::parse_san(host).is_ok() && host != "localhost" {
        names.push(host.to_owned());
    }
    names
}

/// The host name, reduced to characters that are safe in an origin.
pub fn hostname() -> String {
    let raw = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
    let clean: String = raw.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')).collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<BrokerOptions> {
        let dir = tempfile::tempdir()?;
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, crate::policy::DEV_POLICY)?;
        let mut file: ConfigFile = toml::from_str(text)?;
        file.policy.get_or_insert(policy);
        options(file)
    }

    #[test]
    fn defaults_and_errors() {
        let o = parse("").unwrap();
        assert_eq!(o.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(o.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(o.identity_ttl, Duration::from_secs(86_400));
        assert_eq!(o.limits, Limits::default());
        let o = parse("[limits]\nmax_handshakes = 10\nretry_handshakes_above = 3\nreconnects_per_second = 50").unwrap();
        assert_eq!(o.limits, Limits { max_handshakes: 10, retry_above: 3, reconnects_per_second: 50 });
        for (text, want) in [
            ("listen = 'nowhere'", "IP:PORT"),
            ("node_identity_ttl = '1s'", "between"),
            ("node_identity_ttl = 'x'", "duration"),
            ("origin = 'a b'", "origin"),
            ("server_names = ['*.x']", "server_names"),
            ("lisen = '1.2.3.4:5'", "unknown field"),
            ("policy = '/nonexistent/policy.toml'", "cannot read policy file /nonexistent/policy.toml"),
            ("[metrics]\nlisten = '0.0.0.0:9464'", "loopback"),
            ("[admin]\nsocket_mode = '999'", "octal"),
            ("[admin]\nsokcet = '/x'", "unknown field"),
            ("[limits]\nmax_handshakes = 0", "at least 1"),
            ("[limits]\nretry_handshakes_above = 0", "at least 1"),
            ("[limits]\nmax_handshake = 5", "unknown field"),
            ("[limits]\nreconnects_per_second = 0", "at least 1"),
        ] {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
