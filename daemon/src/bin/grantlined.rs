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
        /// Serve the OIDC discovery document and JWKS of trust domain
        /// grantline.dev over HTTPS here (port 0: any free port; the issuer
        /// URL is written to STATE_DIR/oidc-issuer).
        #[arg(long, default_value = "127.0.0.1:0")]
        oidc_listen: String,
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
    /// Run several brokers as one fleet over PostgreSQL (RFD 0010).
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Print this program's man page (roff) to stdout.
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Create the fleet's root CA and SSH CA in DIR (keep DIR offline; its
    /// ca.key signs each broker's intermediates when it joins).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The fleet key's name (it endorses each broker's audit key).
        #[arg(long, default_value = "grantline-fleet")]
        name: String,
    },
    /// Prepare an empty broker state directory to join the fleet: the root
    /// in --root signs the broker's server, node and X.509 CAs. Then start
    /// the broker with the fleet's [state] url and its own origin.
    Join {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        state_dir: PathBuf,
        /// This broker's audit log origin, unique in the fleet (the same as
        /// `origin` in its grantlined.toml).
        #[arg(long)]
        origin: String,
    },
    /// List the brokers registered in the fleet (reads --config's [state]).
    Brokers,
    /// Take a stopped broker out of the fleet: the others stop trusting the
    /// node identities it issued (those nodes renew at another broker first).
    Retire {
        /// The broker's origin, as `fleet brokers` lists it.
        id: String,
    },
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
        Some(Command::Fleet(cmd)) => {
            return match fleet(&cli.config, cmd) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(exit::UNAVAILABLE, &e),
            };
        }
        Some(Command::Dev {
            state_dir,
            listen,
            node_identity_ttl,
            metrics,
            oidc_listen,
            max_handshakes,
            retry_handshakes_above,
            reconnects_per_second,
        }) => match prepare_dev(state_dir, listen, (*node_identity_ttl).into(), metrics.as_deref(), oidc_listen)
            .and_then(|o| {
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

fn fleet(config_path: &std::path::Path, cmd: &FleetCommand) -> Result<()> {
    match cmd {
        FleetCommand::Init { dir, name } => {
            grantline_daemon::pki::init_fleet(dir)?;
            grantline_daemon::server::create_fleet_key(dir, name)?;
            println!("fleet root created in {}: ca.pem (the agents' trust anchor), ca.key and fleet.key (keep them offline), ssh-ca", dir.display());
            Ok(())
        }
        FleetCommand::Join { root, state_dir, origin } => {
            grantline_daemon::pki::join_fleet(root, state_dir)?;
            grantline_daemon::server::endorse_audit_key(root, state_dir, origin)?;
            println!(
                "{} joined the fleet: start the broker with the fleet's [state] url and an origin of its own",
                state_dir.display()
            );
            Ok(())
        }
        FleetCommand::Brokers | FleetCommand::Retire { .. } => {
            let opts = config::load(config_path)?;
            let Some(db) = opts.database else {
                anyhow::bail!("{} has no [state] url: this broker is not in a fleet", config_path.display());
            };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let mut admin = grantline_daemon::state::FleetAdmin::connect(&db).await?;
                match cmd {
                    FleetCommand::Retire { id } => {
                        anyhow::ensure!(admin.retire(id).await?, "no broker {id:?} is registered in the fleet");
                        println!("broker {id} retired from the fleet");
                    }
                    _ => {
                        for b in admin.brokers().await? {
                            let age = grantline_proto::clock::now_unix_ms() - b.heartbeat_ms;
                            println!("{}\t{}\theartbeat {} ms ago", b.id, b.audit_key, age);
                        }
                    }
                }
                Ok(())
            })
        }
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
    oidc_listen: &str,
) -> Result<BrokerOptions> {
    config::prepare_dev_dir(state_dir)?;
    let mut opts = config::dev_options(state_dir, listen, oidc_listen, identity_ttl)?;
    if let Some(m) = metrics {
        opts.metrics = Some(m.parse().with_context(|| format!("--metrics {m:?} is not IP:PORT, e.g. 127.0.0.1:9464"))?);
    }
    Ok(opts)
}

async fn serve(opts: BrokerOptions, dev: bool) -> Result<()> {
    let broker = Broker::open(&opts).await?;
    let addr = broker.local_addr()?;
    if dev {
        let token = broker.create_token(Duration::from_secs(3600)).await?;
        let path = opts.state_dir.join("join-token");
        write_secret(&path, format!("{token}\n").as_bytes())?;
        if let Some(issuer) = broker.oidc_issuer() {
            grantline_proto::files::write_atomic(
                &opts.state_dir.join("oidc-issuer"),
                format!("{issuer}\n").as_bytes(),
                0o644,
            )?;
        }
        eprintln!(
            "grantlined dev: state in {dir}\n  trust anchor: {dir}/ca.pem\n  audit key:    {dir}/audit.vkey\n  join token:   {path} (single use, 1 h)\n  enroll with:  grantline-agent enroll --broker {addr} --token \"$(cat {path})\" --ca-file {dir}/ca.pem --state-dir AGENT_DIR\n  admin:        grantline nodes list --state-dir {dir}\n  SPIFFE:       trust domain {td}, OIDC issuer {issuer}",
            dir = opts.state_dir.display(),
            path = path.display(),
            td = config::DEV_TRUST_DOMAIN,
            issuer = broker.oidc_issuer().unwrap_or("-"),
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
