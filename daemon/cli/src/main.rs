//! grantline: the admin client of a running broker and the offline audit
//! verifier. A crate of its own so that security teams verify with a
//! program that links no QUIC, Vault or gRPC server code.
#![forbid(unsafe_code)]

mod admin;
mod audit;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use grantline_audit::AuditStore;
use grantline_proto::exit;

use crate::report::report_error;

/// Grantline administration and audit verification.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join tokens for enrolling nodes.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled nodes: list, revoke.
    Nodes {
        #[command(subcommand)]
        command: admin::NodesCommand,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// The credential inventory.
    Grants {
        #[command(subcommand)]
        command: admin::GrantsCommand,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// The broker's policy.
    Policy {
        #[command(subcommand)]
        command: admin::PolicyCommand,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print this program's man page (roff) to stdout.
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a single-use join token and print it.
    Create {
        #[command(flatten)]
        conn: admin::Conn,
        /// Pin the node name the token enrolls.
        #[arg(long)]
        node: Option<String>,
        /// Labels for the node, KEY=VALUE; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// How long the token stays valid.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Print audit entries from the running broker (reading is audited).
    Tail {
        /// Start at this seq.
        #[arg(long, conflicts_with = "last")]
        from: Option<u64>,
        /// Start with the last N entries (default 10 unless --from).
        #[arg(long)]
        last: Option<u32>,
        /// Keep printing entries as they are appended.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        conn: admin::Conn,
    },
    /// Verify every entry of an audit log: encoding, hashes, chain, seq, signatures.
    Verify {
        /// The audit database (audit.db). Optional with --anchor.
        #[arg(long, required_unless_present = "anchor")]
        db: Option<PathBuf>,
        /// The log's anchor (directory, or file/s3/gs/az URL): its checkpoint,
        /// entry bundles and tiles are checked, and the database against them.
        #[arg(long)]
        anchor: Option<String>,
        /// The log's verifier key (audit.vkey).
        #[arg(long)]
        key_file: PathBuf,
        #[command(flatten)]
        access: audit::AnchorArgs,
        /// A signed checkpoint kept elsewhere (e.g. an earlier copy or the
        /// anchor's `checkpoint`): catches truncation, rollback and forks.
        /// Repeatable.
        #[arg(long = "checkpoint", value_name = "FILE")]
        checkpoints: Vec<PathBuf>,
        /// Print the verdict as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify the logs of several brokers (RFD 0008): each against its own
    /// verifier key, and no origin twice; prints each verdict and the
    /// fleet's entries and time span.
    VerifyFleet {
        /// One broker's audit database and its verifier key (audit.vkey).
        /// Repeat for each broker.
        #[arg(long = "log", num_args = 2, value_names = ["DB", "KEY_FILE"], required_unless_present = "anchor",
              conflicts_with = "anchor", action = clap::ArgAction::Append)]
        logs: Vec<PathBuf>,
        /// The fleet's shared anchor (RFD 0010): each broker's log is read
        /// and verified under its origin's prefix there, from the anchor alone.
        #[arg(long, requires = "brokers")]
        anchor: Option<String>,
        /// With --anchor: the fleet's brokers, one verifier key (each
        /// broker's audit.vkey, or its audit.vkeys lines) a line.
        #[arg(long, requires = "anchor")]
        brokers: Option<PathBuf>,
        /// With --anchor: a broker whose checkpoint was last written longer
        /// ago than this has stopped publishing (brokers write it every
        /// anchor_heartbeat, 1m by default).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        max_age: std::time::Duration,
        #[command(flatten)]
        access: audit::AnchorArgs,
        /// Print the verdict as JSON.
        #[arg(long)]
        json: bool,
        /// Once every log verifies, print all their entries as one timeline
        /// on stdout, a JSON object a line (time_ms, origin, seq, event),
        /// earliest first; the verdict goes to stderr.
        #[arg(long, conflicts_with_all = ["json", "anchor"])]
        timeline: bool,
    },
    /// Print the offline inclusion proof (C2SP tlog-proof) of one entry, or
    /// the consistency proof from an older tree size, against the latest
    /// checkpoint.
    Prove {
        #[arg(long)]
        db: PathBuf,
        /// The entry (seq) to prove included.
        #[arg(long, required_unless_present = "old_size", conflicts_with = "old_size")]
        index: Option<u64>,
        /// The older tree size to prove the latest checkpoint consistent with.
        #[arg(long)]
        old_size: Option<u64>,
    },
    /// Print the latest signed checkpoint.
    Checkpoint {
        #[arg(long)]
        db: PathBuf,
    },
    /// Replace the log's signing key: appends an entry signed by the old key
    /// naming the new one. The broker must be stopped.
    RotateKey {
        /// The broker's state directory (audit.db, audit.key, audit.vkey).
        #[arg(long)]
        state_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Man => {
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).section("1");
            match page.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report_error(false, exit::SOFTWARE, &e.into()),
            }
        }
        Command::Token(TokenCommand::Create { conn, node, labels, ttl }) => {
            with_runtime(admin::token_create(&conn, node, &labels, ttl.into()))
        }
        Command::Nodes { command, conn } => with_runtime(admin::nodes(&conn, command)),
        Command::Grants { command, conn } => with_runtime(admin::grants(&conn, command)),
        Command::Policy { command, conn } => with_runtime(admin::policy(&conn, command)),
        Command::Audit(AuditCommand::Tail { from, last, follow, conn }) => {
            let last = last.unwrap_or(if from.is_some() { 0 } else { 10 });
            with_runtime(admin::audit_tail(&conn, from, last, follow))
        }
        Command::Audit(AuditCommand::Verify { db, anchor, key_file, access, checkpoints, json }) => {
            let anchor = anchor.as_deref().map(|a| (a, access.access()));
            audit::audit_verify(db.as_deref(), anchor, &key_file, &checkpoints, json)
        }
        Command::Audit(AuditCommand::VerifyFleet {
            anchor: Some(anchor),
            brokers: Some(brokers),
            max_age,
            access,
            json,
            ..
        }) => audit::audit_verify_fleet_anchor(&anchor, &access.access(), &brokers, max_age, json),
        Command::Audit(AuditCommand::VerifyFleet { logs, json, timeline, .. }) => {
            audit::audit_verify_fleet(&logs, json, timeline)
        }
        Command::Audit(AuditCommand::Prove { db, index, old_size }) => match audit::audit_prove(&db, index, old_size) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => report_error(false, exit::DATAERR, &e),
        },
        Command::Audit(AuditCommand::RotateKey { state_dir }) => match audit::rotate_key(&state_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report_error(false, exit::SOFTWARE, &e),
        },
        Command::Audit(AuditCommand::Checkpoint { db }) => {
            match AuditStore::open_read_only(&db).and_then(|s| s.latest_checkpoint()) {
                Ok(Some(note)) => {
                    print!("{note}");
                    ExitCode::SUCCESS
                }
                Ok(None) => {
                    report_error(false, exit::DATAERR, &anyhow::anyhow!("{} holds no checkpoint yet", db.display()))
                }
                Err(e) => report_error(false, exit::NOINPUT, &anyhow::anyhow!("cannot read {}: {e}", db.display())),
            }
        }
    }
}

/// Runs an admin command on a small runtime and maps its error to an exit code.
fn with_runtime(work: impl std::future::Future<Output = Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return admin::fail(&e.into()),
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => admin::fail(&e),
    }
}
