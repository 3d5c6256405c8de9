//! grantline-agent: parse, then call into the library.

use grantline_proto::exit;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use grantline_agent::{enroll, get, local, run, DEFAULT_SOCKET};
use grantline_proto::clock::rfc3339;
use grantline_proto::wire::{self, ErrorCode};

/// The Grantline node agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this node with a broker, using a single-use join token.
    Enroll {
        /// Broker address, HOST:PORT; a fleet's brokers as a comma-separated
        /// list (or one DNS name with several records): the agent keeps the
        /// list and fails over between them.
        #[arg(long)]
        broker: String,
        #[arg(long)]
        token: String,
        /// The broker's trust anchor (ca.pem).
        #[arg(long)]
        ca_file: PathBuf,
        #[arg(long)]
        state_dir: PathBuf,
        /// Node name to ask for (the token may pin one); default: host name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Stay connected to the broker and serve the local socket.
    Run {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Report a grant not proved included in a signed checkpoint within this long.
        #[arg(long, default_value = "30s")]
        inclusion_deadline: humantime::Duration,
        /// Local caller policy, credential sinks and the re-enrollment token
        /// file; a missing file means: only root and the agent's user may ask.
        #[arg(long, default_value = grantline_agent::config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Serve the SPIFFE Workload API and Envoy SDS on this Unix socket
        /// (default: agent.toml's [spiffe] socket, if it has that section).
        #[arg(long)]
        spiffe_socket: Option<PathBuf>,
    },
    /// Ask the running agent for a credential and write it to --out.
    #[command(subcommand)]
    Get(GetCommand),
    /// Give a dynamic secret back before it expires (its lease is revoked).
    Release {
        #[arg(long)]
        lease_id: String,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Show the running agent's node, connection and identity expiry.
    Status {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Print this program's man page (roff) to stdout.
    #[command(hide = true)]
    Man,
}

fn print_man_page() -> ExitCode {
    let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).section("8");
    match page.render(&mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grantline-agent: {e}");
            ExitCode::from(exit::SOFTWARE)
        }
    }
}

#[derive(Subcommand)]
enum GetCommand {
    /// An X.509 certificate: writes cert.pem, key.pem (0600) and ca.pem.
    X509 {
        #[command(flatten)]
        ask: AskArgs,
        /// Subject alternative name (DNS name or IP); repeatable. Default: the node name.
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// An SSH certificate: writes id_ed25519 (0600), id_ed25519.pub, id_ed25519-cert.pub.
    Ssh {
        #[command(flatten)]
        ask: AskArgs,
        /// Principal (user name, or host name with --host); repeatable.
        #[arg(long = "principal", required = true)]
        principals: Vec<String>,
        /// A host certificate instead of a user certificate.
        #[arg(long)]
        host: bool,
    },
    /// A Vault token: writes token (0600) and token.json.
    Token {
        #[command(flatten)]
        ask: AskArgs,
        /// Vault policy for the token; repeatable.
        #[arg(long = "policy", required = true)]
        policies: Vec<String>,
        /// How many times the token may be used (0: the policy's cap, or unlimited).
        #[arg(long, default_value_t = 0)]
        uses: u32,
    },
    /// A dynamic secret such as database credentials: writes secret.json (0600).
    Secret {
        #[command(flatten)]
        ask: AskArgs,
    },
}

/// What every `get` takes.
#[derive(clap::Args)]
struct AskArgs {
    #[arg(long)]
    role: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Lifetime wanted; policy caps it. Default: the role's default.
    #[arg(long)]
    ttl: Option<humantime::Duration>,
}

impl AskArgs {
    fn ask(self) -> get::Ask {
        get::Ask { role: self.role, out: self.out, socket: self.socket, ttl: self.ttl.map(Into::into) }
    }
}

fn exit_for(e: &anyhow::Error) -> ExitCode {
    let wire_err: Option<&wire::Error> =
        e.downcast_ref::<get::Refused>().map(|r| &r.0).or_else(|| e.downcast_ref::<enroll::Refused>().map(|r| &r.0));
    let code = match wire_err.map(|w| ErrorCode::try_from(w.code).unwrap_or(ErrorCode::Unspecified)) {
        Some(ErrorCode::BadRequest) => exit::DATAERR,
        Some(ErrorCode::Unavailable) => exit::UNAVAILABLE,
        Some(
            ErrorCode::PermissionDenied | ErrorCode::InvalidToken | ErrorCode::Unauthenticated | ErrorCode::Revoked,
        ) => exit::NOPERM,
        Some(_) => exit::SOFTWARE,
        None => exit::UNAVAILABLE,
    };
    eprintln!("grantline-agent: {e:#}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    grantline_proto::logging::init("grantline-agent");
    let cli = Cli::parse();
    if let Command::Man = cli.command {
        return print_man_page();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => return exit_for(&e.into()),
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Enroll { broker, token, ca_file, state_dir, name } => {
                let name = name.unwrap_or_else(hostname);
                let cfg =
                    enroll::enroll(enroll::EnrollArgs { broker, token, ca_file, state_dir: state_dir.clone(), name })
                        .await?;
                println!(
                    "enrolled as node {} with broker {}; state in {}",
                    cfg.node_name,
                    cfg.broker,
                    state_dir.display()
                );
                Ok(())
            }
            Command::Run { state_dir, socket, inclusion_deadline, config, spiffe_socket } => {
                let config = grantline_agent::config::AgentConfigFile::load(&config)?;
                let inclusion_deadline = inclusion_deadline.into();
                run::run(
                    run::RunArgs { state_dir, socket, inclusion_deadline, config, spiffe_socket },
                    shutdown_signal(),
                )
                .await
            }
            Command::Get(what) => {
                let written = match what {
                    GetCommand::X509 { ask, sans } => get::get_x509(&ask.ask(), sans).await?,
                    GetCommand::Ssh { ask, principals, host } => get::get_ssh(&ask.ask(), principals, host).await?,
                    GetCommand::Token { ask, policies, uses } => get::get_token(&ask.ask(), policies, uses).await?,
                    GetCommand::Secret { ask } => get::get_secret(&ask.ask()).await?,
                };
                println!("wrote {}; valid until {}", written.files, rfc3339(written.response.not_after_unix));
                Ok(())
            }
            Command::Release { lease_id, socket } => {
                get::release(&socket, &lease_id).await?;
                println!("lease {lease_id} revoked");
                Ok(())
            }
            Command::Man => Ok(()),
            Command::Status { socket } => {
                let resp = local::request(
                    &socket,
                    &wire::LocalRequest { body: Some(wire::local_request::Body::Status(wire::StatusRequest {})) },
                )
                .await?;
                match resp.body {
                    Some(wire::local_response::Body::Status(s)) => {
                        println!(
                            "node {} broker {} {} identity valid until {}",
                            s.node_name,
                            s.broker,
                            if s.connected { "connected" } else { "disconnected" },
                            rfc3339(s.identity_not_after_unix)
                        );
                        Ok(())
                    }
                    Some(wire::local_response::Body::Error(e)) => Err(get::Refused(e).into()),
                    _ => anyhow::bail!("unexpected answer from the agent"),
                }
            }
        }
    });
    // A blocking task stuck on a file system that never answers (an
    // executable check) must not hold the agent's exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_for(&e),
    }
}

fn hostname() -> String {
    let raw = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
    let clean: String = raw.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')).collect();
    if clean.is_empty() {
        "node".into()
    } else {
        clean
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when it is first polled, so a signal that arrives right after
/// the readiness line is a clean shutdown, not the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let signals = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = signals else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}
