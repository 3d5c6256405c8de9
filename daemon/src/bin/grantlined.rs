//! grantlined: parse and validate, build, run.

use grantline_proto::exit;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use grantline_daemon::config;
use grantline_daemon::server::{Broker, BrokerOptions};
use grantline_proto::files::write_secret;

/// The Grantline access broker.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Production configuration file.
    #[arg(long, default_value = "/etc/grantline/grantlined.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a development broker on embedded defaults: its own CAs, a permissive
    /// policy allowing role "dev", and a fresh join token, all in --state-dir.
    Dev {
        #[arg(long, default_value = ".grantline-dev")]
        state_dir: PathBuf,
        #[arg(long, default_value = config::DEFAULT_DEV_LISTEN)]
        listen: String,
        /// Lifetime of node identity certificates (agents renew at half of it).
        #[arg(long, default_value = "24h")]
        node_identity_ttl: humantime::Duration,
        /// Serve Prometheus metrics on this loopback address (e.g. 127.0.0.1:9464).
        #[arg(long)]
        metrics: Option<String>,
        /// Handshakes in flight at which new connections are refused.
        #[arg(long)]
        max_handshakes: Option<usize>,
        /// Handshakes in flight above which agents must answer a QUIC retry first.
        #[arg(long)]
        retry_handshakes_above: Option<usize>,
        /// Reconnections per second a restart asks its agents to keep to.
        #[arg(long)]
        reconnects_per_second: Option<usize>,
    },
    /// Print this program's man page (roff) to stdout.
    #[command(hide = true)]
    Man,
}

fn main() -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    grantline_proto::logging::init("grantlined");
    let cli = Cli::parse();
    let (opts, dev) = match &cli.command {
        Some(Command::Man) => {
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).section("8");
            return match page.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(exit::UNAVAILABLE, &e.into()),
            };
        }
        Some(Command::Dev {
            state_dir,
            listen,
            node_identity_ttl,
            metrics,
            max_handshakes,
            retry_handshakes_above,
            reconnects_per_second,
        }) => match prepare_dev(state_dir, listen, (*node_identity_ttl).into(), metrics.as_deref()).and_then(|o| {
            let limits = config::limits(config::LimitsFile {
                max_handshakes: *max_handshakes,
                retry_handshakes_above: *retry_handshakes_above,
                reconnects_per_second: *reconnects_per_second,
            })?;
            Ok(BrokerOptions { limits, ..o })
        }) {
            Ok(o) => (o, true),
            Err(e) => return fail(exit::CONFIG, &e),
        },
        None => match config::load(&cli.config) {
            Ok(o) => (o, false),
            Err(e) => return fail(exit::CONFIG, &e),
        },
    };
    if let Err(e) = grantline_daemon::server::check_key_files(&opts.state_dir) {
        return fail(exit::CONFIG, &e);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(exit::UNAVAILABLE, &e.into()),
    };
    match runtime.block_on(serve(opts, dev)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(exit::UNAVAILABLE, &e),
    }
}

fn fail(code: u8, e: &anyhow::Error) -> ExitCode {
    eprintln!("grantlined: {e:#}");
    ExitCode::from(code)
}

fn prepare_dev(
    state_dir: &std::path::Path,
    listen: &str,
    identity_ttl: Duration,
    metrics: Option<&str>,
) -> Result<BrokerOptions> {
    config::prepare_dev_dir(state_dir)?;
    let mut opts = config::dev_options(state_dir, listen, identity_ttl)?;
    if let Some(m) = metrics {
        opts.metrics = Some(m.parse().with_context(|| format!("--metrics {m:?} is not IP:PORT, e.g. 127.0.0.1:9464"))?);
    }
    Ok(opts)
}

async fn serve(opts: BrokerOptions, dev: bool) -> Result<()> {
    let broker = Broker::open(&opts)?;
    let addr = broker.local_addr()?;
    if dev {
        let token = broker.create_token(Duration::from_secs(3600)).await?;
        let path = opts.state_dir.join("join-token");
        write_secret(&path, format!("{token}\n").as_bytes())?;
        eprintln!(
            "grantlined dev: state in {dir}\n  trust anchor: {dir}/ca.pem\n  audit key:    {dir}/audit.vkey\n  join token:   {path} (single use, 1 h)\n  enroll with:  grantline-agent enroll --broker {addr} --token \"$(cat {path})\" --ca-file {dir}/ca.pem --state-dir AGENT_DIR\n  admin:        grantline nodes list --state-dir {dir}",
            dir = opts.state_dir.display(),
            path = path.display(),
        );
    }
    let shutdown = shutdown_signal();
    tracing::info!(%addr, origin = %broker.verifier_key().name(), "listening");
    println!("grantlined ready on {addr}");
    // The listener is bound and the audit log open: tell systemd (Type=notify).
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd of readiness");
    }
    if let Some(m) = broker.metrics_addr() {
        println!("grantlined metrics on http://{m}/metrics");
    }
    broker.run(shutdown).await
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when it is first polled, so a signal that arrives right after
/// the readiness line is a clean shutdown, not the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let signals = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = signals else {
            tracing::error!("cannot install signal handlers; stop the broker with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
