//! grantline: the admin and verification CLI.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use grantline_daemon::audit::anchor::Anchor;
use grantline_daemon::audit::AuditStore;
use grantline_daemon::state::{rfc3339, StateDb};
use grantline_daemon::{config, verify};
use grantline_proto::audit::checkpoint::{Checkpoint, InclusionReceipt};
use grantline_proto::audit::{merkle, SignerKey, VerifierKey};

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
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a single-use join token and print it.
    Create {
        /// The broker's state directory (default: from --config).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long, default_value = "/etc/grantline/grantlined.toml")]
        config: PathBuf,
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

const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;
const EX_NOINPUT: u8 = 66;
const EX_SOFTWARE: u8 = 70;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Token(TokenCommand::Create { state_dir, config: cfg, node, labels, ttl }) => {
            match create_token(state_dir, &cfg, node, &labels, ttl.into()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("grantline: {e:#}");
                    ExitCode::from(EX_SOFTWARE)
                }
            }
        }
        Command::Audit(AuditCommand::Verify { db, anchor, key_file, checkpoints, json }) => {
            audit_verify(db.as_deref(), anchor.as_deref(), &key_file, &checkpoints, json)
        }
        Command::Audit(AuditCommand::Prove { db, index, old_size }) => match audit_prove(&db, index, old_size) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => report_error(false, EX_DATAERR, &e),
        },
        Command::Audit(AuditCommand::RotateKey { state_dir }) => match rotate_key(&state_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report_error(false, EX_SOFTWARE, &e),
        },
        Command::Audit(AuditCommand::Checkpoint { db }) => {
            match AuditStore::open_read_only(&db).and_then(|s| s.latest_checkpoint()) {
                Ok(Some(note)) => {
                    print!("{note}");
                    ExitCode::SUCCESS
                }
                Ok(None) => {
                    report_error(false, EX_DATAERR, &anyhow::anyhow!("{} holds no checkpoint yet", db.display()))
                }
                Err(e) => report_error(false, EX_NOINPUT, &anyhow::anyhow!("cannot read {}: {e}", db.display())),
            }
        }
    }
}

fn create_token(
    state_dir: Option<PathBuf>,
    cfg: &std::path::Path,
    node: Option<String>,
    labels: &[String],
    ttl: std::time::Duration,
) -> Result<()> {
    let dir = match state_dir {
        Some(d) => d,
        None => config::load(cfg)?.state_dir,
    };
    let mut map = BTreeMap::new();
    for l in labels {
        let Some((k, v)) = l.split_once('=') else { bail!("label {l:?} is not KEY=VALUE") };
        map.insert(k.to_owned(), v.to_owned());
    }
    let db = dir.join("state.db");
    if !db.exists() {
        bail!("{} does not exist; start the broker once so it creates its state", db.display());
    }
    let state = StateDb::open(&db)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let t = state.create_token(node.as_deref(), &map, ttl, now).context("cannot store the token")?;
    println!("{}", t.token);
    eprintln!("token {} expires at {}; it can be used once", t.id, rfc3339(t.expires_at));
    Ok(())
}

fn rotate_key(dir: &std::path::Path) -> Result<()> {
    let _lock = grantline_daemon::server::lock_state_dir(dir)
        .context("grantlined is running on this state directory; stop it before rotating the key")?;
    let key_path = dir.join("audit.key");
    let old = SignerKey::parse(&grantline_proto::files::read_secret(&key_path)?)
        .with_context(|| format!("{} is not a signed-note private key", key_path.display()))?;
    let new = SignerKey::generate(old.verifier().name())?;
    let seq = grantline_daemon::audit::writer::rotate_key(&dir.join("audit.db"), &old, &new)?;
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
    let body = grantline_proto::audit::note::body(&note).context("the latest checkpoint is not a note")?;
    let cp = Checkpoint::parse_body(body).context("the latest checkpoint is malformed")?;
    if let Some(old) = old_size {
        if old == 0 || old > cp.size {
            bail!("--old-size must be between 1 and the latest checkpoint's size {}", cp.size);
        }
        // grantline/consistency-proof@v1: the sizes, the RFC 9162 proof
        // hashes, a blank line, and the newer checkpoint.
        let mut out = format!("grantline/consistency-proof@v1\nold {old}\nnew {}\n", cp.size);
        for h in merkle::consistency_proof(&store, old, cp.size)? {
            out.push_str(&base64::engine::Engine::encode(&base64::engine::general_purpose::STANDARD, h));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&note);
        return Ok(out);
    }
    let index = index.context("give --index or --old-size")?;
    if index >= cp.size {
        bail!("entry {index} is not in the latest checkpoint (size {}); try again in a second", cp.size);
    }
    let proof = merkle::inclusion_proof(&store, index, cp.size)?;
    Ok(InclusionReceipt { index, proof, checkpoint_note: note }.format())
}

fn audit_verify(
    db: Option<&std::path::Path>,
    anchor: Option<&str>,
    key_file: &std::path::Path,
    checkpoints: &[PathBuf],
    json: bool,
) -> ExitCode {
    let key = match std::fs::read_to_string(key_file)
        .with_context(|| format!("cannot read key file {}", key_file.display()))
        .and_then(|s| VerifierKey::parse(&s).with_context(|| format!("{} is not a verifier key", key_file.display())))
    {
        Ok(k) => k,
        Err(e) => return report_error(json, EX_NOINPUT, &e),
    };
    let mut notes = Vec::new();
    for path in checkpoints {
        match std::fs::read_to_string(path) {
            Ok(n) => notes.push(n),
            Err(e) => {
                return report_error(
                    json,
                    EX_NOINPUT,
                    &anyhow::anyhow!("cannot read checkpoint {}: {e}", path.display()),
                )
            }
        }
    }
    let mut verdict = None;
    if let Some(location) = anchor {
        let checked =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from).and_then(
                |rt| rt.block_on(async { verify::verify_anchor(&Anchor::open_existing(location)?, &key).await }),
            );
        match checked {
            Err(e) => return report_error(json, EX_NOINPUT, &e),
            Ok((Err(f), _)) => return report_verdict(json, Err(f)),
            Ok((Ok(summary), note)) => {
                notes.push(note);
                verdict = Some(Ok(summary));
            }
        }
    }
    if let Some(db) = db {
        verdict = match verify::verify_db(db, &key, std::io::stderr().is_terminal(), &notes) {
            Err(e) => return report_error(json, EX_NOINPUT, &e),
            Ok(v) => Some(v),
        };
    }
    match verdict {
        Some(v) => report_verdict(json, v),
        None => report_error(json, EX_USAGE, &anyhow::anyhow!("give --db, --anchor, or both")),
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
            ExitCode::from(EX_DATAERR)
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
