//! The offline audit commands: verify (a database, an anchor, or both),
//! verify a fleet's logs and print their timeline, prove, rotate the key.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use grantline_audit::anchor::{Access, Anchor};
use grantline_audit::prove::{prove, Which};
use grantline_audit::AuditStore;
use grantline_audit::{fleet, fleet_anchor, verify};
use grantline_proto::audit::{SignerKey, VerifierKey};
use grantline_proto::exit;

use crate::report::{report_error, report_verdict};

pub(crate) fn rotate_key(dir: &std::path::Path) -> Result<()> {
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

pub(crate) fn audit_prove(db: &std::path::Path, index: Option<u64>, old_size: Option<u64>) -> Result<String> {
    let store = AuditStore::open_read_only(db).with_context(|| format!("cannot open {}", db.display()))?;
    let note = store.latest_checkpoint()?.with_context(|| format!("{} holds no checkpoint yet", db.display()))?;
    let which = match (index, old_size) {
        (_, Some(old)) => Which::Consistency(old),
        (Some(i), None) => Which::Inclusion(i),
        (None, None) => bail!("give --index or --old-size"),
    };
    Ok(prove(&store, &note, which)?.0)
}

/// How the CLI reaches a cloud anchor (see `grantline_audit::anchor::Access`).
#[derive(clap::Args, Debug)]
pub(crate) struct AnchorArgs {
    /// A 0600 file of object-store options for --anchor, `KEY=VALUE` a line
    /// (AWS_ACCESS_KEY_ID, AWS_ENDPOINT, GOOGLE_SERVICE_ACCOUNT_KEY,
    /// AZURE_STORAGE_ACCOUNT_KEY, …), beside those in the environment.
    #[arg(long, value_name = "FILE")]
    anchor_options: Option<PathBuf>,
    /// Let a cloud --anchor take credentials from this machine's metadata
    /// service; without credentials it is otherwise refused.
    #[arg(long)]
    instance_credentials: bool,
}

impl AnchorArgs {
    pub(crate) fn access(&self) -> Access {
        Access { instance_credentials: self.instance_credentials, options_file: self.anchor_options.clone() }
    }
}

pub(crate) fn audit_verify(
    db: Option<&std::path::Path>,
    anchor: Option<(&str, Access)>,
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
    let origin = keys[0].name().to_owned();
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
        (None, Some((location, access))) => on_anchor(location, &access, &origin, |anchor| async move {
            // Only the newest key given vouches for an anchor: its entries
            // carry no signatures, so nothing in it proves a rotation.
            let current = keys.last().cloned().into_iter().collect::<Vec<_>>();
            Ok(verify::verify_anchor(&anchor, &keys, &current).await?.0)
        }),
        // The database proves the key rotations (its entries are signed), so
        // it goes first: the anchor's checkpoint is one more checkpoint it must
        // agree with, and the anchor's entries are then checked under the keys
        // the database reached.
        (Some(db), Some((location, access))) => on_anchor(location, &access, &origin, |anchor| async move {
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

/// Runs `work` on the log of `origin` at `location` (the anchor itself, or
/// the origin's prefix in a fleet's shared anchor) on a runtime of its own.
fn on_anchor<F, T>(location: &str, access: &Access, origin: &str, work: impl FnOnce(Anchor) -> F) -> Result<T>
where
    F: std::future::Future<Output = Result<T>>,
{
    let anchor = Anchor::open_existing(location, access)?;
    runtime()?.block_on(async move { work(anchor.log_of(origin).await?).await })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
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

pub(crate) fn audit_verify_fleet(logs: &[PathBuf], json: bool, timeline: bool) -> ExitCode {
    let mut verdicts = Vec::new();
    for pair in logs.chunks(2) {
        let [db, key_file] = pair else {
            return report_error(json, exit::USAGE, &anyhow::anyhow!("--log takes a database and a key file"));
        };
        let verdict = read_verifier_keys(key_file)
            .and_then(|keys| verify::verify_db(db, &keys, std::io::stderr().is_terminal(), &[]));
        match verdict {
            Ok(verdict) => verdicts.push(fleet::FleetLog { db: db.display().to_string(), verdict }),
            Err(e) => return report_error(json, exit::NOINPUT, &e),
        }
    }
    let code = report_fleet(&verdicts, Vec::new(), json, timeline, "db");
    if code == ExitCode::SUCCESS && timeline {
        if let Err(e) = print_timeline(&verdicts) {
            return report_error(false, exit::NOINPUT, &e);
        }
    }
    code
}

/// `verify-fleet --anchor URL --brokers FILE`: each broker's log from the
/// shared anchor alone, naming each broker missing or no longer publishing.
pub(crate) fn audit_verify_fleet_anchor(
    location: &str,
    access: &Access,
    brokers_file: &std::path::Path,
    max_age: std::time::Duration,
    json: bool,
) -> ExitCode {
    let brokers = grantline_proto::files::read_bounded(brokers_file, MAX_KEY_FILE)
        .with_context(|| format!("cannot read the brokers file {}", brokers_file.display()))
        .and_then(|text| fleet_anchor::parse_brokers(&text, &brokers_file.display().to_string()));
    let brokers = match brokers {
        Ok(b) => b,
        Err(e) => return report_error(json, exit::NOINPUT, &e),
    };
    let checked = Anchor::open_existing(location, access).and_then(|anchor| {
        runtime()?.block_on(fleet_anchor::verify_brokers(&anchor, &brokers, max_age, std::time::SystemTime::now()))
    });
    match checked {
        Ok((verdicts, problems)) => report_fleet(&verdicts, problems, json, false, "anchor"),
        Err(e) => report_error(json, exit::NOINPUT, &e),
    }
}

/// Prints the fleet's verdict (with `problems` found beside the logs';
/// each log is labelled by `source`, "db" or "anchor", in JSON).
fn report_fleet(
    verdicts: &[fleet::FleetLog],
    mut problems: Vec<String>,
    json: bool,
    timeline: bool,
    source: &str,
) -> ExitCode {
    let mut fleet = fleet::fleet_verdict(verdicts);
    fleet.ok &= problems.is_empty();
    problems.append(&mut fleet.problems);
    fleet.problems = problems;
    if json {
        let logs: Vec<_> = verdicts
            .iter()
            .map(|l| match &l.verdict {
                Ok(s) => serde_json::json!({source: l.db, "ok": true, "origin": s.origin, "entries": s.entries, "head": s.head, "root": s.root}),
                Err(f) => serde_json::json!({source: l.db, "ok": false, "seq": f.seq, "reason": f.reason}),
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
        for l in verdicts {
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
    if fleet.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::DATAERR)
    }
}

/// The verified logs' entries merged on time, one JSON object a line.
fn print_timeline(logs: &[fleet::FleetLog]) -> Result<()> {
    use std::io::Write;
    let mut streams = Vec::new();
    let failed = std::cell::RefCell::new(None);
    for l in logs {
        let Ok(verified) = &l.verdict else { anyhow::bail!("{} did not verify", l.db) };
        streams.push(fleet::log_entries(std::path::Path::new(&l.db), verified)?);
    }
    // A read error ends that log's stream; it is reported after the merge.
    let streams: Vec<_> =
        streams.into_iter().map(|s| s.map_while(|r| r.map_err(|e| *failed.borrow_mut() = Some(e)).ok())).collect();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for e in fleet::merge_by_time(streams) {
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
