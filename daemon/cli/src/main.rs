//! grantline: the admin client of a running broker and the offline audit
//! verifier. A crate of its own so that security teams verify with a
//! program that links no QUIC, Vault or gRPC server code.
#![forbid(unsafe_code)]

mod admin;

use grantline_proto::exit;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use grantline_audit::anchor::Anchor;
use grantline_audit::prove::{prove, Which};
use grantline_audit::verify;
use grantline_audit::AuditStore;
use grantline_proto::audit::{SignerKey, VerifierKey};

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
        #[arg(long = "log", num_args = 2, value_names = ["DB", "KEY_FILE"], required = true,
              action = clap::ArgAction::Append)]
        logs: Vec<PathBuf>,
        /// Print the verdict as JSON.
        #[arg(long)]
        json: bool,
        /// Once every log verifies, print all their entries as one timeline
        /// on stdout, a JSON object a line (time_ms, origin, seq, event),
        /// earliest first; the verdict goes to stderr.
        #[arg(long, conflicts_with = "json")]
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
        Command::Audit(AuditCommand::Verify { db, anchor, key_file, checkpoints, json }) => {
            audit_verify(db.as_deref(), anchor.as_deref(), &key_file, &checkpoints, json)
        }
        Command::Audit(AuditCommand::VerifyFleet { logs, json, timeline }) => audit_verify_fleet(&logs, json, timeline),
        Command::Audit(AuditCommand::Prove { db, index, old_size }) => match audit_prove(&db, index, old_size) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => report_error(false, exit::DATAERR, &e),
        },
        Command::Audit(AuditCommand::RotateKey { state_dir }) => match rotate_key(&state_dir) {
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

fn rotate_key(dir: &std::path::Path) -> Result<()> {
    let _lock = grantline_audit::lock_state_dir(dir)
        .context("grantlined is running on this state directory; stop it before rotating the key")?;
    let key_path = dir.join("audit.key");
    let old = SignerKey::parse(&grantline_proto::files::read_secret(&key_path)?)
        .with_context(|| format!("{} is not a signed-note private key", key_path.display()))?;
    let new = SignerKey::generate(old.verifier().name())?;
    let seq = grantline_audit::writer::rotate_key(&dir.join("audit.db"), &old, &new)?;
    // The old private key is gone once the new one is in place; the public
    // history stays in the log (and in audit.vkeys for convenience).
    let history = dir.join("audit.vkeys");
    let mut keys = std::fs::read_to_string(&history).unwrap_or_else(|_| format!("{}\n", old.verifier()));
    keys.push_str(&format!("{}\n", new.verifier()));
    grantline_proto::files::write_atomic(&history, keys.as_bytes(), 0o644)?;
    grantline_proto::files::write_secret(&key_path, new.to_private_string().as_bytes())?;
    grantline_proto::files::write_atomic(&dir.join("audit.vkey"), format!("{}\n", new.verifier()).as_bytes(), 0o644)?;
    println!("rotated the audit key at seq {seq}: {} -> {}", old.verifier(), new.verifier());
    Ok(())
}

fn audit_prove(db: &std::path::Path, index: Option<u64>, old_size: Option<u64>) -> Result<String> {
    let store = AuditStore::open_read_only(db).with_context(|| format!("cannot open {}", db.display()))?;
    let note = store.latest_checkpoint()?.with_context(|| format!("{} holds no checkpoint yet", db.display()))?;
    let which = match (index, old_size) {
        (_, Some(old)) => Which::Consistency(old),
        (Some(i), None) => Which::Inclusion(i),
        (None, None) => bail!("give --index or --old-size"),
    };
    Ok(prove(&store, &note, which)?.0)
}

fn audit_verify(
    db: Option<&std::path::Path>,
    anchor: Option<&str>,
    key_file: &std::path::Path,
    checkpoints: &[PathBuf],
    json: bool,
) -> ExitCode {
    let keys = match read_verifier_keys(key_file) {
        Ok(k) => k,
        Err(e) => return report_error(json, exit::NOINPUT, &e),
    };
    let mut notes = Vec::new();
    for path in checkpoints {
        match grantline_proto::files::read_bounded(path, MAX_NOTE_FILE) {
            Ok(n) => notes.push(n),
            Err(e) => {
                return report_error(
                    json,
                    exit::NOINPUT,
                    &anyhow::anyhow!("cannot read checkpoint {}: {e}", path.display()),
                )
            }
        }
    }
    let verdict = match (db, anchor) {
        (None, None) => return report_error(json, exit::USAGE, &anyhow::anyhow!("give --db, --anchor, or both")),
        (Some(db), None) => verify::verify_db(db, &keys, std::io::stderr().is_terminal(), &notes),
        (None, Some(_)) if !notes.is_empty() => {
            return report_error(
                json,
                exit::USAGE,
                &anyhow::anyhow!("--checkpoint is compared with the log's entries: give --db with it"),
            )
        }
        (None, Some(location)) => on_anchor(location, |anchor| async move {
            // Only the newest key given vouches for an anchor: its entries
            // carry no signatures, so nothing in it proves a rotation.
            let current = keys.last().cloned().into_iter().collect::<Vec<_>>();
            Ok(verify::verify_anchor(&anchor, &keys, &current).await?.0)
        }),
        // The database proves the key rotations (its entries are signed), so
        // it goes first: the anchor's checkpoint is one more checkpoint it must
        // agree with, and the anchor's entries are then checked under the keys
        // the database reached.
        (Some(db), Some(location)) => on_anchor(location, |anchor| async move {
            let note = verify::anchor_checkpoint(&anchor).await?;
            notes.push(note.clone());
            let summary = match verify::verify_db(db, &keys, std::io::stderr().is_terminal(), &notes)? {
                Ok(s) => s,
                Err(f) => return Ok(Err(f)),
            };
            let (from_anchor, checked) = verify::verify_anchor(&anchor, &keys, &summary.keys).await?;
            if checked != note {
                anyhow::bail!("the anchor's checkpoint changed during verification (the broker published); run again");
            }
            Ok(from_anchor.map(|_| summary))
        }),
    };
    match verdict {
        Ok(v) => report_verdict(json, v),
        Err(e) => report_error(json, exit::NOINPUT, &e),
    }
}

/// Runs `work` on the anchor at `location` on a runtime of its own.
fn on_anchor<F, T>(location: &str, work: impl FnOnce(Anchor) -> F) -> Result<T>
where
    F: std::future::Future<Output = Result<T>>,
{
    let anchor = Anchor::open_existing(location)?;
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(work(anchor))
}

/// Longest key file read: a key history of a few thousand rotations.
const MAX_KEY_FILE: u64 = 1 << 20;
/// Longest checkpoint file read: a note with a few hundred signatures.
const MAX_NOTE_FILE: u64 = 1 << 20;

/// The verifier keys in `path`, one per line: `audit.vkey` (the current key)
/// or `audit.vkeys` (the key history, genesis key first).
fn read_verifier_keys(path: &std::path::Path) -> Result<Vec<VerifierKey>> {
    let text = grantline_proto::files::read_bounded(path, MAX_KEY_FILE)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    let keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| {
            VerifierKey::parse(l).with_context(|| format!("{} line {} is not a verifier key", path.display(), i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    if keys.is_empty() {
        bail!("{} holds no verifier key; give the broker's audit.vkey or audit.vkeys", path.display());
    }
    Ok(keys)
}

fn audit_verify_fleet(logs: &[PathBuf], json: bool, timeline: bool) -> ExitCode {
    let mut verdicts = Vec::new();
    for pair in logs.chunks(2) {
        let [db, key_file] = pair else {
            return report_error(json, exit::USAGE, &anyhow::anyhow!("--log takes a database and a key file"));
        };
        let verdict = read_verifier_keys(key_file)
            .and_then(|keys| verify::verify_db(db, &keys, std::io::stderr().is_terminal(), &[]));
        match verdict {
            Ok(verdict) => verdicts.push(verify::FleetLog { db: db.display().to_string(), verdict }),
            Err(e) => return report_error(json, exit::NOINPUT, &e),
        }
    }
    let fleet = verify::fleet_verdict(&verdicts);
    if json {
        let logs: Vec<_> = verdicts
            .iter()
            .map(|l| match &l.verdict {
                Ok(s) => serde_json::json!({"db": l.db, "ok": true, "origin": s.origin, "entries": s.entries, "head": s.head, "root": s.root}),
                Err(f) => serde_json::json!({"db": l.db, "ok": false, "seq": f.seq, "reason": f.reason}),
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"ok": fleet.ok, "entries": fleet.entries, "first_time_ms": fleet.first_time_ms,
                "last_time_ms": fleet.last_time_ms, "logs": logs, "problems": fleet.problems})
        );
    } else {
        // With a timeline, stdout is the timeline's alone.
        let say = |line: String| if timeline { eprintln!("{line}") } else { println!("{line}") };
        for l in &verdicts {
            if let Ok(s) = &l.verdict {
                say(format!(
                    "OK: {} entries in log {}, head {}, root {} ({})",
                    s.entries, s.origin, s.head, s.root, l.db
                ));
            }
        }
        for p in &fleet.problems {
            say(format!("FAILED: {p}"));
        }
        if fleet.ok {
            say(format!("OK: {} logs, {} entries", verdicts.len(), fleet.entries));
        }
    }
    if !fleet.ok {
        return ExitCode::from(exit::DATAERR);
    }
    if timeline {
        if let Err(e) = print_timeline(&verdicts) {
            return report_error(false, exit::NOINPUT, &e);
        }
    }
    ExitCode::SUCCESS
}

/// The verified logs' entries merged on time, one JSON object a line.
fn print_timeline(logs: &[verify::FleetLog]) -> Result<()> {
    use std::io::Write;
    let mut streams = Vec::new();
    let failed = std::cell::RefCell::new(None);
    for l in logs {
        let Ok(verified) = &l.verdict else { anyhow::bail!("{} did not verify", l.db) };
        streams.push(verify::log_entries(std::path::Path::new(&l.db), verified)?);
    }
    // A read error ends that log's stream; it is reported after the merge.
    let streams: Vec<_> =
        streams.into_iter().map(|s| s.map_while(|r| r.map_err(|e| *failed.borrow_mut() = Some(e)).ok())).collect();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for e in verify::merge_by_time(streams) {
        let event: serde_json::Value = serde_json::from_slice(&e.event_json).unwrap_or(serde_json::Value::Null);
        writeln!(
            out,
            "{}",
            serde_json::json!({"time_ms": e.time_ms, "origin": e.origin, "seq": e.seq, "event": event})
        )?;
    }
    out.flush()?;
    match failed.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn report_verdict(
    json: bool,
    verdict: Result<grantline_proto::audit::Summary, grantline_proto::audit::Failure>,
) -> ExitCode {
    match verdict {
        Ok(s) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": true, "entries": s.entries, "origin": s.origin, "head": s.head, "root": s.root, "first_time_ms": s.first_time_ms, "last_time_ms": s.last_time_ms})
                );
            } else {
                println!("OK: {} entries in log {}, head {}, root {}", s.entries, s.origin, s.head, s.root);
            }
            ExitCode::SUCCESS
        }
        Err(f) => {
            if json {
                println!("{}", serde_json::json!({"ok": false, "seq": f.seq, "reason": f.reason}));
            } else {
                println!("FAILED at seq {}: {}", f.seq, f.reason);
            }
            ExitCode::from(exit::DATAERR)
        }
    }
}

fn report_error(json: bool, code: u8, e: &anyhow::Error) -> ExitCode {
    if json {
        println!("{}", serde_json::json!({"ok": false, "error": format!("{e:#}")}));
    } else {
        eprintln!("grantline: {e:#}");
    }
    ExitCode::from(code)
}
