//! `grantline-agent run`: ties the agent's parts together (the connection,
//! identity renewal, inclusion checks, the local server and the sinks) and
//! stops them in order.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Result;
use grantline_proto::clock::now_unix as now;
use tokio::sync::{watch, Notify};

use crate::config::AgentConfigFile;
use crate::connection::maintain_connection;
use crate::inclusion::confirm_inclusion_loop;
use crate::local_server::{bind_socket, serve_socket};
use crate::renewal::renew_identity_loop;
use crate::session::{announce, Agent};
use crate::state::AgentState;
use crate::tls;

pub struct RunArgs {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// How long a grant may go without being proved included in a checkpoint
    /// before the agent reports it.
    pub inclusion_deadline: Duration,
    /// agent.toml: local caller policy, sinks, re-enrollment token file.
    pub config: AgentConfigFile,
    /// Serve the SPIFFE socket here (over agent.toml's `[spiffe] socket`,
    /// or with its defaults when the file has no `[spiffe]`).
    pub spiffe_socket: Option<PathBuf>,
}

pub async fn run(args: RunArgs, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let state = AgentState::load(&args.state_dir)?;
    if state.identity.not_after <= now() {
        tracing::warn!(
            token_file = %args.config.join_token_file.display(),
            "the node identity expired; the agent re-enrolls with a join token from the token file"
        );
    }
    let targets = tls::targets(&state.config.broker)?;
    let listener = bind_socket(&args.socket, args.config.socket_mode)?;
    let spiffe = match (args.config.spiffe.clone(), args.spiffe_socket) {
        (None, None) => None,
        (settings, path) => {
            let mut settings = match settings {
                Some(s) => s,
                None => crate::spiffe_config::SpiffeSettings::from_file(Default::default(), |_| Ok(0o666))?,
            };
            if let Some(p) = path {
                settings.socket = p;
            }
            let listener = bind_socket(&settings.socket, settings.socket_mode)?;
            Some((settings, listener))
        }
    };
    let sinks = args.config.sinks.clone();
    let agent = Arc::new(Agent {
        state_dir: args.state_dir.clone(),
        policy: args.config,
        revoked: std::sync::atomic::AtomicBool::new(false),
        endpoint: tls::endpoint_for(targets[0].0)?,
        // Agents of a fleet start at different brokers of the list.
        next_target: std::sync::atomic::AtomicUsize::new(rand::random::<usize>() % targets.len()),
        targets,
        fleet_key: state.fleet_key,
        config: state.config,
        ca_pem: state.ca_pem,
        audit_key: RwLock::new(state.audit_key),
        identity: RwLock::new(state.identity),
        client: std::sync::Mutex::new(None),
        conn: watch::channel(None).0,
        renewed: Notify::new(),
        unconfirmed: std::sync::Mutex::new(Vec::new()),
        inclusion_deadline: args.inclusion_deadline,
    });
    let spiffe_path = spiffe.as_ref().map(|(s, _)| s.socket.clone());
    let serve_spiffe = async {
        match spiffe {
            None => std::future::pending().await,
            Some((settings, listener)) => {
                let svids = crate::svids::Svids::new(
                    agent.clone(),
                    settings.role.clone(),
                    settings.broker_requests_per_second,
                    crate::principals::Principals::load(std::path::Path::new("/etc/subuid")),
                );
                crate::spiffe_socket::serve(svids, listener, settings.sds).await
            }
        }
    };
    match &spiffe_path {
        Some(p) => announce(&format!(
            "grantline-agent ready on {} (SPIFFE_ENDPOINT_SOCKET=unix://{})",
            args.socket.display(),
            p.display()
        )),
        None => announce(&format!("grantline-agent ready on {}", args.socket.display())),
    }
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd of readiness");
    }
    tracing::info!(node = %agent.config.node_name, broker = %agent.config.broker, "agent running");
    let result = tokio::select! {
        () = maintain_connection(agent.clone()) => Ok(()),
        () = renew_identity_loop(agent.clone()) => Ok(()),
        () = confirm_inclusion_loop(agent.clone()) => Ok(()),
        r = serve_socket(agent.clone(), listener) => r,
        r = serve_spiffe => r,
        () = crate::sinks::keep_all(agent.clone(), sinks) => Ok(()),
        () = watchdog() => Ok(()),
        () = shutdown => Ok(()),
    };
    let _ = std::fs::remove_file(&args.socket);
    if let Some(p) = spiffe_path {
        let _ = std::fs::remove_file(p);
    }
    if let Some(c) = agent.conn.borrow().as_ref() {
        c.close(0u32.into(), b"agent stopping");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), agent.endpoint.wait_idle()).await;
    result
}

/// Pings systemd's watchdog at half its interval while the runtime turns;
/// pending forever without one.
async fn watchdog() {
    let Some(every) = sd_notify::watchdog_enabled() else { return std::future::pending().await };
    let mut tick = tokio::time::interval(every / 2);
    loop {
        tick.tick().await;
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]) {
            tracing::warn!(error = %e, "cannot ping the systemd watchdog");
        }
    }
}
