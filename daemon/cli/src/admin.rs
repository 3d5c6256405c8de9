//! The admin commands: a gRPC client of the broker's admin API on its Unix
//! socket. Tables for people, `--json` for scripts, sysexits exit codes.

use grantline_proto::exit;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use grantline_proto::admin::admin_client::AdminClient;
use grantline_proto::admin::{self as api};
use grantline_proto::admin_file::{self, AdminFile};
use grantline_proto::clock::rfc3339;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

/// How to reach the broker's admin API.
#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// The admin socket (default: from --config, else /run/grantline/admin.sock).
    #[arg(long, env = "GRANTLINE_ADMIN_SOCKET", global = true)]
    pub socket: Option<PathBuf>,
    /// A dev broker's state directory: its socket is DIR/admin.sock.
    #[arg(long, global = true, conflicts_with = "socket")]
    pub state_dir: Option<PathBuf>,
    /// The broker's configuration, read for `[admin] socket`.
    #[arg(long, global = true, default_value = "/etc/grantline/grantlined.toml")]
    pub config: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Conn {
    fn socket_path(&self) -> Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        if let Some(d) = &self.state_dir {
            return Ok(d.join("admin.sock"));
        }
        if self.config.exists() {
            return socket_of_config(&self.config);
        }
        Ok(admin_file::DEFAULT_SOCKET.into())
    }

    async fn client(&self) -> Result<AdminClient<Channel>> {
        let path = self.socket_path()?;
        if !path.exists() {
            return Err(Unreachable(format!(
                "no admin socket at {}; is grantlined running (see --socket, --config)?",
                path.display()
            ))
            .into());
        }
        let target = path.clone();
        // The URI is not used for a Unix socket; the connector dials the path.
        let channel = Endpoint::from_static("http://grantlined.admin")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let target = target.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(target).await?)) }
            }))
            .await
            .map_err(|e| Unreachable(format!("cannot connect to the admin socket {}: {e}", path.display())))?;
        // A fleet's node list or inventory is larger than tonic's 4 MiB default.
        Ok(AdminClient::new(channel).max_decoding_message_size(512 << 20))
    }
}

/// The admin socket a `grantlined.toml` configures: its `[admin]` section
/// alone is read (the broker checks the rest when it starts).
fn socket_of_config(path: &std::path::Path) -> Result<PathBuf> {
    #[derive(serde::Deserialize)]
    struct OnlyAdmin {
        admin: Option<AdminFile>,
    }
    let text = grantline_proto::files::read_bounded(path, admin_file::MAX_CONFIG_FILE)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let file: OnlyAdmin =
        toml::from_str(&text).with_context(|| format!("config file {} is invalid", path.display()))?;
    let admin = file.admin.unwrap_or_default();
    if !admin.enabled() {
        bail!("{} disables the admin API ([admin] enabled = false)", path.display());
    }
    admin.mode().map_err(anyhow::Error::msg)?;
    Ok(admin.socket())
}

/// The broker could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(String);

#[derive(clap::Subcommand, Debug)]
pub enum NodesCommand {
    /// Every enrolled node: labels, connection, last seen, identity expiry.
    List,
    /// Revoke a node: disconnect it, refuse its identity, revoke its Vault leases.
    Revoke {
        name: String,
        /// Why; recorded in the audit log.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum GrantsCommand {
    /// The credential inventory: live grants by node, kind and expiry.
    List {
        #[arg(long)]
        node: Option<String>,
        /// x509, ssh-user, ssh-host, vault-token or secret.
        #[arg(long)]
        kind: Option<String>,
        /// Include grants that expired (in the last day) or were revoked.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Re-read the policy file; an invalid one is refused and the old one stays.
    Reload,
}

/// Prints the error and maps it to a sysexits code.
pub fn fail(e: &anyhow::Error) -> ExitCode {
    let code = if let Some(s) = e.downcast_ref::<tonic::Status>() {
        eprintln!("grantline: {}", s.message());
        match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::OutOfRange => exit::DATAERR,
            tonic::Code::NotFound => exit::NOUSER,
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => exit::NOPERM,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => exit::TEMPFAIL,
            _ => exit::SOFTWARE,
        }
    } else if e.downcast_ref::<Unreachable>().is_some() {
        eprintln!("grantline: {e:#}");
        exit::UNAVAILABLE
    } else {
        eprintln!("grantline: {e:#}");
        exit::DATAERR
    };
    ExitCode::from(code)
}

fn when(unix: i64) -> String {
    if unix == 0 {
        "-".into()
    } else {
        rfc3339(unix)
    }
}

/// Prints rows as a table with a header, columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn labels_text(labels: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    sorted.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

pub async fn token_create(
    conn: &Conn,
    node: Option<String>,
    labels: &[String],
    ttl: std::time::Duration,
) -> Result<()> {
    let mut map = std::collections::HashMap::new();
    for l in labels {
        let Some((k, v)) = l.split_once('=') else { bail!("label {l:?} is not KEY=VALUE") };
        map.insert(k.to_owned(), v.to_owned());
    }
    let ttl_seconds = u32::try_from(ttl.as_secs()).context("--ttl is too long")?;
    if ttl_seconds == 0 {
        // On the wire 0 means "the default" (1 h): never what `--ttl 0` meant.
        bail!("--ttl {} is shorter than a second; give a duration such as 10m or 1h", humantime::format_duration(ttl));
    }
    let req = api::CreateJoinTokenRequest { node_name: node.unwrap_or_default(), labels: map, ttl_seconds };
    let t = conn.client().await?.create_join_token(req).await?.into_inner();
    if conn.json {
        println!("{}", json!({"token": t.token, "token_id": t.token_id, "expires_at": rfc3339(t.expires_at_unix)}));
    } else {
        println!("{}", t.token);
        eprintln!("token {} expires at {}; it can be used once", t.token_id, rfc3339(t.expires_at_unix));
    }
    Ok(())
}

pub async fn nodes(conn: &Conn, cmd: NodesCommand) -> Result<()> {
    let mut client = conn.client().await?;
    match cmd {
        NodesCommand::List => {
            let nodes = client.list_nodes(api::ListNodesRequest {}).await?.into_inner().nodes;
            if conn.json {
                let list: Vec<_> = nodes
                    .iter()
                    .map(|n| {
                        json!({
                            "name": n.name,
                            "labels": n.labels,
                            "connected": n.connected,
                            "connected_to": n.connected_to,
                            "last_seen": (n.last_seen_unix != 0).then(|| rfc3339(n.last_seen_unix)),
                            "identity_not_after": rfc3339(n.identity_not_after_unix),
                            "identity_serial": n.identity_serial,
                            "revoked": n.revoked,
                            "revoked_at": (n.revoked_at_unix != 0).then(|| rfc3339(n.revoked_at_unix)),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                let rows: Vec<Vec<String>> = nodes
                    .iter()
                    .map(|n| {
                        let state = if n.revoked {
                            "revoked".to_owned()
                        } else if !n.connected_to.is_empty() {
                            format!("connected to {}", n.connected_to.join(", "))
                        } else if n.connected {
                            "connected".to_owned()
                        } else {
                            "disconnected".to_owned()
                        };
                        vec![
                            n.name.clone(),
                            state,
                            when(n.last_seen_unix),
                            when(n.identity_not_after_unix),
                            labels_text(&n.labels),
                        ]
                    })
                    .collect();
                table(&["NODE", "STATE", "LAST SEEN", "IDENTITY UNTIL", "LABELS"], &rows);
            }
        }
        NodesCommand::Revoke { name, reason } => {
            let r = client.revoke_node(api::RevokeNodeRequest { node_name: name.clone(), reason }).await?.into_inner();
            if conn.json {
                println!(
                    "{}",
                    json!({"node": name, "audit_seq": r.audit_seq, "was_connected": r.was_connected,
                           "leases_revoked": r.leases_revoked, "leases_failed": r.leases_failed})
                );
            } else {
                println!(
                    "node {name} revoked (audit seq {}){}; {} lease(s) revoked",
                    r.audit_seq,
                    if r.was_connected { ", disconnected" } else { "" },
                    r.leases_revoked
                );
            }
            if !r.leases_failed.is_empty() {
                eprintln!(
                    "grantline: Vault did not revoke {} lease(s) now ({}); they end at their TTL",
                    r.leases_failed.len(),
                    r.leases_failed.join(", ")
                );
                return Err(tonic::Status::unavailable("some leases were not revoked").into());
            }
        }
    }
    Ok(())
}

pub async fn grants(conn: &Conn, cmd: GrantsCommand) -> Result<()> {
    let GrantsCommand::List { node, kind, all, limit } = cmd;
    let req = api::ListGrantsRequest {
        node_name: node.unwrap_or_default(),
        kind: kind.unwrap_or_default(),
        include_expired: all,
        limit,
    };
    let grants = conn.client().await?.list_grants(req).await?.into_inner().grants;
    if conn.json {
        let list: Vec<_> = grants
            .iter()
            .map(|g| {
                json!({
                    "audit_seq": g.audit_seq, "node": g.node_name, "kind": g.kind, "role": g.role,
                    "serial": g.serial, "fingerprint": g.fingerprint, "names": g.names,
                    "granted_at": rfc3339(g.granted_at_unix), "not_after": rfc3339(g.not_after_unix),
                    "revoked_at": (g.revoked_at_unix != 0).then(|| rfc3339(g.revoked_at_unix)),
                    "caller": (!g.caller_exe.is_empty() || g.caller_uid != 0).then(|| json!({
                        "uid": g.caller_uid, "exe": g.caller_exe, "unit": g.caller_unit})),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        let rows: Vec<Vec<String>> = grants
            .iter()
            .map(|g| {
                vec![
                    g.audit_seq.to_string(),
                    g.node_name.clone(),
                    g.kind.clone(),
                    g.role.clone(),
                    when(g.not_after_unix),
                    grant_state(g).into(),
                    g.names.join(","),
                ]
            })
            .collect();
        table(&["SEQ", "NODE", "KIND", "ROLE", "EXPIRES", "STATE", "NAMES"], &rows);
    }
    Ok(())
}

fn grant_state(g: &api::Grant) -> &'static str {
    if g.revoked_at_unix != 0 {
        "revoked"
    } else if g.not_after_unix <= grantline_proto::clock::now_unix() {
        "expired"
    } else {
        "live"
    }
}

pub async fn audit_tail(conn: &Conn, from: Option<u64>, last: u32, follow: bool) -> Result<()> {
    use std::io::Write;
    let req = api::TailAuditRequest { from_seq: from, last, follow };
    let mut stream = conn.client().await?.tail_audit(req).await?.into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(e) = stream.message().await? {
        let time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.time_unix_ms) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_default();
        if conn.json {
            let event: serde_json::Value = serde_json::from_str(&e.event_json).unwrap_or(serde_json::Value::Null);
            writeln!(out, "{}", json!({"seq": e.seq, "time": time, "event": event}))?;
        } else {
            writeln!(out, "{:>8}  {time}  {:<16}  {}", e.seq, e.event_type, e.event_json)?;
        }
        out.flush()?;
    }
    Ok(())
}

pub async fn policy(conn: &Conn, cmd: PolicyCommand) -> Result<()> {
    let PolicyCommand::Reload = cmd;
    let r = conn.client().await?.reload_policy(api::ReloadPolicyRequest {}).await?.into_inner();
    if conn.json {
        println!("{}", json!({"policy_hash": r.policy_hash, "rules": r.rules, "changed": r.changed}));
    } else {
        println!(
            "policy {} in force: {} rule(s){}",
            r.policy_hash,
            r.rules,
            if r.changed { "" } else { " (unchanged)" }
        );
    }
    Ok(())
}
