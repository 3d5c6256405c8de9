//! Checkpoints and proofs: what the hash chain alone cannot catch — a
//! truncated tail, a rollback, a fork — is caught with signed checkpoints.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use grantline_proto::audit::checkpoint::{Checkpoint, InclusionReceipt};
use grantline_proto::audit::VerifierKey;
use grantline_tests::{bin, stderr, verify_db, Agent, Broker};

fn grants(agent: &Agent, n: usize, tag: &str) {
    for i in 0..n {
        let out = tempfile::tempdir().unwrap();
        let san = format!("{tag}{i}.example.com");
        let got = agent.get(&["x509", "--role", "dev", "--san", &san, "--out", out.path().to_str().unwrap()]);
        assert!(got.status.success(), "{}", stderr(&got));
    }
}

fn latest_checkpoint(db: &Path) -> String {
    let out = Command::new(bin("grantline")).args(["audit", "checkpoint", "--db"]).arg(db).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn key(broker: &Broker) -> VerifierKey {
    VerifierKey::parse(&std::fs::read_to_string(broker.path("audit.vkey")).unwrap()).unwrap()
}

/// Stops the broker with SIGTERM (which writes a final checkpoint).
fn stop(broker: &mut Broker) {
    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(broker.proc.wait().success());
}

fn snapshot(db: &Path, to: &Path) -> PathBuf {
    let dest = to.join("audit.db");
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute("VACUUM INTO ?1", [dest.to_str().unwrap()]).unwrap();
    dest
}

fn verify_with(db: &Path, key_file: &Path, checkpoint: Option<&str>) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin("grantline"));
    cmd.args(["audit", "verify", "--json", "--db"]).arg(db).arg("--key-file").arg(key_file);
    if let Some(cp) = checkpoint {
        let f = dir.path().join("checkpoint");
        std::fs::write(&f, cp).unwrap();
        cmd.arg("--checkpoint").arg(f);
    }
    let out = cmd.output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.success(), v["ok"] == true, "{v}");
    v
}

#[test]
fn checkpoints_cover_the_log_and_the_final_one_is_written_at_shutdown() {
    let mut broker = Broker::start();
    let agent = Agent::start(&broker, "cp");
    grants(&agent, 3, "a");
    // While the broker runs, a checkpoint covering the grants appears within
    // the one-second interval (bounded wait).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let cp = Checkpoint::open(&latest_checkpoint(&broker.path("audit.db")), &key(&broker)).unwrap();
        if cp.size >= 5 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no checkpoint covers the grants after 10 s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    grants(&agent, 2, "b");
    stop(&mut broker);
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
    let cp = Checkpoint::open(&latest_checkpoint(&broker.path("audit.db")), &key(&broker)).unwrap();
    assert_eq!(cp.size, v["entries"].as_u64().unwrap(), "the shutdown checkpoint covers every entry");
    assert_eq!(hex::encode(cp.root), v["root"].as_str().unwrap());
}

#[test]
fn inclusion_proofs_verify_offline_and_reject_other_entries() {
    let mut broker = Broker::start();
    let agent = Agent::start(&broker, "proofs");
    grants(&agent, 5, "p");
    stop(&mut broker);
    let db = broker.path("audit.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let hash_of = |seq: i64| -> [u8; 32] {
        conn.query_row("SELECT hash FROM entries WHERE seq = ?1", [seq], |r| r.get::<_, Vec<u8>>(0))
            .unwrap()
            .try_into()
            .unwrap()
    };
    for index in 0..7u64 {
        let out = Command::new(bin("grantline"))
            .args(["audit", "prove", "--db"])
            .arg(&db)
            .args(["--index", &index.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("c2sp.org/tlog-proof@v1\nindex "), "{text}");
        let receipt = InclusionReceipt::parse(&text).unwrap();
        let seq = i64::try_from(index).unwrap();
        receipt.verify(&hash_of(seq), &[key(&broker)]).unwrap();
        let other = (seq + 1) % 7;
        assert!(receipt.verify(&hash_of(other), &[key(&broker)]).is_err(), "proof of {index} accepted entry {other}");
    }
    let out = Command::new(bin("grantline"))
        .args(["audit", "prove", "--db"])
        .arg(&db)
        .args(["--index", "99"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(stderr(&out).contains("not in the latest checkpoint"), "{}", stderr(&out));
}

#[test]
fn truncation_and_rollback_are_caught_by_checkpoints() {
    let mut broker = Broker::start();
    let agent = Agent::start(&broker, "tr");
    grants(&agent, 2, "t");
    let early = tempfile::tempdir().unwrap();
    let old_copy = snapshot(&broker.path("audit.db"), early.path());
    grants(&agent, 3, "u");
    stop(&mut broker);
    let db = broker.path("audit.db");
    let key_file = broker.path("audit.vkey");
    let latest = latest_checkpoint(&db);
    let size = Checkpoint::open(&latest, &key(&broker)).unwrap().size;

    // Truncated tail: the stored checkpoints give it away on their own.
    let t = tempfile::tempdir().unwrap();
    let truncated = snapshot(&db, t.path());
    let conn = rusqlite::Connection::open(&truncated).unwrap();
    conn.execute_batch("DROP TRIGGER entries_no_delete; DROP TRIGGER tree_nodes_no_delete;").unwrap();
    conn.execute("DELETE FROM entries WHERE seq >= ?1", [i64::try_from(size).unwrap() - 2]).unwrap();
    let v = verify_with(&truncated, &key_file, None);
    assert!(v["reason"].as_str().unwrap().contains("truncated or the log was rolled back"), "{v}");

    // Truncated tail and its checkpoints removed too: only a checkpoint kept
    // elsewhere catches it.
    conn.execute_batch("DROP TRIGGER checkpoints_no_delete;").unwrap();
    conn.execute("DELETE FROM checkpoints WHERE size > ?1", [i64::try_from(size).unwrap() - 2]).unwrap();
    drop(conn);
    assert_eq!(verify_with(&truncated, &key_file, None)["ok"], true, "a clean-looking prefix is a valid log by itself");
    let v = verify_with(&truncated, &key_file, Some(&latest));
    assert_eq!(v["seq"].as_i64().unwrap(), i64::try_from(size).unwrap() - 2, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("given checkpoint"), "{v}");

    // Rollback to an older copy of the whole database.
    let v = verify_with(&old_copy, &key_file, Some(&latest));
    assert!(v["reason"].as_str().unwrap().contains("rolled back"), "{v}");
    assert_eq!(verify_with(&db, &key_file, Some(&latest))["ok"], true);
}

#[test]
fn a_fork_with_the_same_key_is_caught() {
    // Two brokers share one history and key, then diverge: a fork.
    let mut a = Broker::start();
    let agent_a = Agent::start(&a, "fork-a");
    grants(&agent_a, 2, "shared");
    stop(&mut a);
    let copy = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(a.dir.path()).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), copy.path().join(f.file_name())).unwrap();
        }
    }
    // Branch A goes on.
    let mut a2 = Broker::start_in(a.dir.path());
    drop(agent_a);
    let agent_a2 = Agent::start(&a2, "fork-a2");
    grants(&agent_a2, 3, "left");
    stop(&mut a2);
    // Branch B, from the copy, writes other entries.
    let mut b = Broker::start_in(copy.path());
    let agent_b = Agent::start(&b, "fork-b");
    grants(&agent_b, 2, "right");
    stop(&mut b);
    let b_checkpoint = latest_checkpoint(&b.path("audit.db"));
    let b_size = Checkpoint::open(&b_checkpoint, &key(&b)).unwrap().size;
    let a_entries = verify_db(&a2.path("audit.db"), &a2.path("audit.vkey")).1["entries"].as_u64().unwrap();
    assert!(b_size <= a_entries, "branch B ({b_size}) should not be longer than A ({a_entries}) for this test");
    let v = verify_with(&a2.path("audit.db"), &a2.path("audit.vkey"), Some(&b_checkpoint));
    assert!(v["reason"].as_str().unwrap().starts_with("fork:"), "{v}");
}

fn verify_anchor(anchor: &Path, key_file: &Path, db: Option<&Path>) -> serde_json::Value {
    let mut cmd = Command::new(bin("grantline"));
    cmd.args(["audit", "verify", "--json", "--anchor"]).arg(anchor).arg("--key-file").arg(key_file);
    if let Some(db) = db {
        cmd.arg("--db").arg(db);
    }
    let out = cmd.output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {} {}", String::from_utf8_lossy(&out.stdout), stderr(&out)));
    assert_eq!(out.status.success(), v["ok"] == true, "{v}");
    v
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn the_anchor_alone_verifies_and_catches_tampered_tiles_bundles_and_truncation() {
    let mut broker = Broker::start();
    let agent = Agent::start(&broker, "anchored");
    grants(&agent, 4, "z");
    stop(&mut broker);
    let anchor = broker.path("anchor");
    let key_file = broker.path("audit.vkey");
    let db = broker.path("audit.db");
    assert!(anchor.join("checkpoint").exists() && anchor.join("tile/entries/000.p").exists(), "nothing published");

    let from_anchor = verify_anchor(&anchor, &key_file, None);
    let from_db = verify_with(&db, &key_file, None);
    assert_eq!(from_anchor["entries"], from_db["entries"], "{from_anchor} vs {from_db}");
    assert_eq!(from_anchor["root"], from_db["root"]);
    assert_eq!(verify_anchor(&anchor, &key_file, Some(&db))["ok"], true);

    // Verifying a missing anchor is an error, and creates nothing.
    let nowhere = broker.path("no-such-anchor");
    let out = Command::new(bin("grantline"))
        .args(["audit", "verify", "--anchor"])
        .arg(&nowhere)
        .arg("--key-file")
        .arg(&key_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(66), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert!(!nowhere.exists());

    let size = from_db["entries"].as_u64().unwrap();
    // A level-0 tile with one hash changed.
    let t = tempfile::tempdir().unwrap();
    copy_dir(&anchor, t.path());
    let tile = t.path().join(format!("tile/0/000.p/{size}"));
    let mut bytes = std::fs::read(&tile).unwrap();
    bytes[5] ^= 1;
    std::fs::write(&tile, bytes).unwrap();
    let v = verify_anchor(t.path(), &key_file, None);
    assert!(v["reason"].as_str().unwrap().contains("disagrees with the entries"), "{v}");

    // An entry bundle with one entry edited.
    let e = tempfile::tempdir().unwrap();
    copy_dir(&anchor, e.path());
    let bundle = e.path().join(format!("tile/entries/000.p/{size}"));
    let text = std::fs::read(&bundle).unwrap();
    let edited: Vec<u8> = String::from_utf8_lossy(&text).replace("z2.example", "z9.example").into_bytes();
    assert_ne!(edited, text);
    std::fs::write(&bundle, edited).unwrap();
    let v = verify_anchor(e.path(), &key_file, None);
    assert_eq!(v["ok"], false, "{v}");

    // The database truncated behind the anchor's back.
    let d = tempfile::tempdir().unwrap();
    let truncated = snapshot(&db, d.path());
    let conn = rusqlite::Connection::open(&truncated).unwrap();
    conn.execute_batch("DROP TRIGGER entries_no_delete; DROP TRIGGER checkpoints_no_delete;").unwrap();
    conn.execute("DELETE FROM entries WHERE seq >= 3", []).unwrap();
    conn.execute("DELETE FROM checkpoints WHERE size > 3", []).unwrap();
    drop(conn);
    let v = verify_anchor(&anchor, &key_file, Some(&truncated));
    assert!(v["reason"].as_str().unwrap().contains("rolled back"), "{v}");
}

#[test]
fn key_rotation_is_followed_by_verifiers_and_agents() {
    let mut broker = Broker::start();
    let mut agent = Agent::start(&broker, "rot");
    grants(&agent, 2, "before");
    let rotate = |b: &Broker| {
        Command::new(bin("grantline")).args(["audit", "rotate-key", "--state-dir"]).arg(b.dir.path()).output().unwrap()
    };
    // Not while the broker runs.
    let busy = rotate(&broker);
    assert!(!busy.status.success());
    assert!(stderr(&busy).contains("stop it before rotating"), "{}", stderr(&busy));

    stop(&mut broker);
    let old_vkey = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(broker.path("audit.vkey"), old_vkey.path()).unwrap();
    let out = rotate(&broker);
    assert!(out.status.success(), "{}", stderr(&out));
    let new_vkey = std::fs::read_to_string(broker.path("audit.vkey")).unwrap();
    assert_ne!(new_vkey, std::fs::read_to_string(old_vkey.path()).unwrap());

    // The broker signs with the new key; the agent, which pinned the old one,
    // follows the rotation its receipts prove, and saves the new key.
    broker.restart();
    agent.wait_connected();
    grants(&agent, 2, "after");
    assert_eq!(std::fs::read_to_string(agent.dir.path().join("audit.vkey")).unwrap(), new_vkey);
    stop(&mut broker);

    let db = broker.path("audit.db");
    assert_eq!(verify_with(&db, old_vkey.path(), None)["ok"], true, "the genesis key still verifies the log");
    // The current key alone does not vouch for the entries its predecessor
    // signed; the key history, which starts with the genesis key, does.
    let v = verify_with(&db, &broker.path("audit.vkey"), None);
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("audit.vkeys"), "{v}");
    assert_eq!(verify_with(&db, &broker.path("audit.vkeys"), None)["ok"], true, "the key history verifies the log");
    let stranger = grantline_proto::audit::SignerKey::generate(key(&broker).name()).unwrap();
    let stranger_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(stranger_file.path(), stranger.verifier().to_string()).unwrap();
    let v = verify_with(&db, stranger_file.path(), None);
    assert!(v["reason"].as_str().unwrap().contains("not by the key given"), "{v}");

    // A checkpoint signed by a key the log never announced is refused.
    let latest = Checkpoint::open_any(&latest_checkpoint(&db), &[key(&broker)]).unwrap();
    let forged = latest.sign(&stranger).unwrap();
    let v = verify_with(&db, &broker.path("audit.vkeys"), Some(&forged));
    assert!(v["reason"].as_str().unwrap().contains("does not verify"), "{v}");
    // The anchor, republished after the rotation, verifies too.
    assert_eq!(verify_anchor(&broker.path("anchor"), old_vkey.path(), Some(&db))["ok"], true);
}

#[test]
fn agents_confirm_each_grant_is_in_a_signed_checkpoint_or_report_it() {
    let broker = Broker::start();
    let mut agent = Agent::start(&broker, "watcher");
    grants(&agent, 1, "seen");
    // genesis 0, the dev join token's creation 1, the agent's token's 2,
    // enrollment 3, the grant 4.
    let line = agent.wait_line("grantline-agent confirmed seq 4 in checkpoint of size");
    assert!(line.parse::<u64>().unwrap() >= 5, "{line}");

    // A broker that stops answering after a grant: the agent reports the grant
    // it could not confirm once the deadline (30 s by default, 3 s here) passes.
    agent.proc = None;
    let mut agent = Agent::run_with(agent, &["--inclusion-deadline", "3s"]);
    grants(&agent, 1, "unseen");
    broker.proc.signal(nix::sys::signal::Signal::SIGSTOP);
    let missing = agent.wait_line("grantline-agent inclusion missing for seq 5:");
    assert!(!missing.is_empty());
    broker.proc.signal(nix::sys::signal::Signal::SIGCONT);
}
