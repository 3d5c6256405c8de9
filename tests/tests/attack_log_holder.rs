//! The attacker holds a copy of the audit database, or write access to the
//! anchor, and every key but the broker's: what they hand to a security team
//! must not verify under the broker's key. RFD 0009 lists the rows.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use grantline_proto::audit::checkpoint::Checkpoint;
use grantline_proto::audit::entry::leaf_hash;
use grantline_proto::audit::merkle::MemoryTree;
use grantline_proto::audit::{tiles, Entry, Event, Hash, SignerKey, ZERO_HASH};
use grantline_tests::{bin, Broker, Proc};

/// The real broker's key (public half only, as an attacker has it).
fn real_key() -> (Broker, grantline_proto::audit::VerifierKey) {
    let broker = Broker::start();
    let key = grantline_proto::audit::VerifierKey::parse(&std::fs::read_to_string(broker.path("audit.vkey")).unwrap())
        .unwrap();
    (broker, key)
}

/// A log of `events` under `origin`, every entry signed by `signer`.
struct Forged {
    rows: Vec<(Vec<u8>, Hash, [u8; 64])>,
    tree: MemoryTree,
}

fn forge(origin: &str, events: &[Event], signer: &SignerKey) -> Forged {
    let mut prev = ZERO_HASH;
    let mut tree = MemoryTree::default();
    let rows = events
        .iter()
        .enumerate()
        .map(|(seq, e)| {
            let bytes = Entry::encode(origin, seq as u64, 1_700_000_000_000 + seq as i64, &prev, e);
            prev = leaf_hash(&bytes);
            tree.push(prev);
            let sig = signer.sign(&bytes);
            (bytes, prev, sig)
        })
        .collect();
    Forged { rows, tree }
}

fn denial(i: usize) -> Event {
    Event::Denial {
        action: "grant".into(),
        node: format!("n{i}"),
        kind: "x509".into(),
        role: "dev".into(),
        policy: String::new(),
        reason: "forged".into(),
        caller: None,
    }
}

fn checkpoint(f: &Forged, origin: &str, by: &SignerKey) -> String {
    Checkpoint { origin: origin.into(), size: f.tree.size(), root: f.tree.root() }.sign(by).unwrap()
}

fn write_db(path: &Path, f: &Forged, checkpoint: &str) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        // Grantline's own table shapes, so the verifier's checks of the
        // rows (not of the schema) are what refuse the forgery.
        "CREATE TABLE entries (seq INTEGER PRIMARY KEY, hash BLOB NOT NULL, entry BLOB NOT NULL, signature BLOB NOT NULL) STRICT;
         CREATE TABLE checkpoints (size INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL, note TEXT NOT NULL) STRICT;",
    )
    .unwrap();
    for (seq, (entry, hash, sig)) in f.rows.iter().enumerate() {
        conn.execute(
            "INSERT INTO entries VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![seq as i64, hash.to_vec(), entry, sig.to_vec()],
        )
        .unwrap();
    }
    conn.execute("INSERT INTO checkpoints VALUES (?1, 0, ?2)", rusqlite::params![f.tree.size() as i64, checkpoint])
        .unwrap();
}

/// An anchor in the tlog-tiles layout (one partial tile: fewer than 256 entries).
fn write_anchor(dir: &Path, f: &Forged, checkpoint: &str) {
    let size = f.tree.size();
    let put = |rel: String, bytes: &[u8]| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    };
    let entries: Vec<&[u8]> = f.rows.iter().map(|(e, _, _)| e.as_slice()).collect();
    put(tiles::bundle_path(0, size), &tiles::bundle_bytes(&entries).unwrap());
    put(tiles::tile_path(0, 0, size), &tiles::tile_bytes(f.tree.level(0)));
    put("checkpoint".into(), checkpoint.as_bytes());
}

fn verify(args: &[&str], extra: &[&Path]) -> (Option<i32>, serde_json::Value) {
    let mut cmd = Command::new(bin("grantline"));
    cmd.args(["audit"]).args(args);
    for p in extra {
        cmd.arg(p);
    }
    cmd.arg("--json");
    let out = cmd.output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code(), v)
}

/// Review defect 1: a log started by the attacker's key under the broker's
/// origin, signed throughout by it, ending in a rotation that names the real
/// key, verified OK under the real key with --db, --anchor and verify-fleet.
#[test]
fn a_log_forged_under_another_key_does_not_verify_under_the_brokers() {
    let (_broker, real) = real_key();
    let origin = real.name().to_owned();
    let evil = SignerKey::generate(&origin).unwrap();
    let mut events = vec![Event::Genesis { vkey: evil.verifier().to_string(), software: "forged".into() }];
    events.extend((1..5).map(denial));
    events.push(Event::KeyRotation { new_vkey: real.to_string() });
    let forged = forge(&origin, &events, &evil);
    let note = checkpoint(&forged, &origin, &evil);

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    write_db(&db, &forged, &note);
    let vkey = dir.path().join("audit.vkey");
    std::fs::write(&vkey, format!("{real}\n")).unwrap();
    let anchor = dir.path().join("anchor");
    write_anchor(&anchor, &forged, &note);

    let (code, v) = verify(&["verify", "--db"], &[&db, Path::new("--key-file"), &vkey]);
    assert_eq!((code, v["ok"].as_bool()), (Some(65), Some(false)), "{v}");
    assert_eq!(v["seq"], 0, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("not by the key given"), "{v}");

    let (code, v) = verify(&["verify", "--anchor"], &[&anchor, Path::new("--key-file"), &vkey]);
    assert_eq!((code, v["ok"].as_bool()), (Some(65), Some(false)), "{v}");

    let (code, v) = verify(&["verify-fleet", "--log"], &[&db, &vkey]);
    assert_eq!((code, v["ok"].as_bool()), (Some(65), Some(false)), "{v}");
}

/// The anchor's entry bundles carry no signatures, so a rotation written
/// into them proves nothing: an anchor whose genesis names the real key,
/// rotated to the attacker's key, with a checkpoint the attacker signed,
/// must not verify under the real key.
#[test]
fn an_anchor_cannot_rotate_trust_to_a_key_of_its_own() {
    let (_broker, real) = real_key();
    let origin = real.name().to_owned();
    let evil = SignerKey::generate(&origin).unwrap();
    let mut events = vec![Event::Genesis { vkey: real.to_string(), software: "forged".into() }];
    events.push(Event::KeyRotation { new_vkey: evil.verifier().to_string() });
    events.extend((2..6).map(denial));
    let forged = forge(&origin, &events, &evil);
    let dir = tempfile::tempdir().unwrap();
    let anchor = dir.path().join("anchor");
    write_anchor(&anchor, &forged, &checkpoint(&forged, &origin, &evil));
    let vkey = dir.path().join("audit.vkey");
    std::fs::write(&vkey, format!("{real}\n")).unwrap();
    let (code, v) = verify(&["verify", "--anchor"], &[&anchor, Path::new("--key-file"), &vkey]);
    assert_eq!((code, v["ok"].as_bool()), (Some(65), Some(false)), "{v}");
    assert!(v["reason"].as_str().unwrap().contains("does not verify under the keys given"), "{v}");
}

/// An empty log carries no signature at all: it proves nothing, and says so.
#[test]
fn an_empty_log_is_not_reported_sound() {
    let (broker, _) = real_key();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let empty = Forged { rows: Vec::new(), tree: MemoryTree::default() };
    write_db(&db, &empty, "x");
    rusqlite::Connection::open(&db).unwrap().execute_batch("DELETE FROM checkpoints").unwrap();
    let (code, v) = verify(&["verify", "--db"], &[&db, Path::new("--key-file"), &broker.path("audit.vkey")]);
    assert_eq!(code, Some(65), "{v}");
    assert!(v["reason"].as_str().unwrap().contains("the log is empty"), "{v}");
}

/// Review defect 13: an 8 KB database whose `entries` is a view over an
/// endless recursive query hung the verifier. It is refused at once.
#[test]
fn a_crafted_database_cannot_hang_the_verifier() {
    let (broker, _) = real_key();
    let dir = tempfile::tempdir().unwrap();
    let crafted = [
        "CREATE VIEW entries AS WITH RECURSIVE r(seq) AS (SELECT 0 UNION ALL SELECT seq + 1 FROM r) \
         SELECT seq, x'00' AS hash, x'00' AS entry, x'00' AS signature FROM r;",
        "CREATE TABLE entries (seq INTEGER PRIMARY KEY, hash BLOB, entry BLOB, signature BLOB); \
         CREATE TABLE log (x); CREATE TRIGGER spy AFTER INSERT ON entries BEGIN INSERT INTO log VALUES (1); END;",
        "CREATE VIRTUAL TABLE entries USING fts5(seq, hash, entry, signature);",
    ];
    for (i, sql) in crafted.iter().enumerate() {
        let db = dir.path().join(format!("crafted{i}.db"));
        rusqlite::Connection::open(&db).unwrap().execute_batch(sql).unwrap();
        let mut proc = Proc::spawn(
            "grantline",
            Command::new(bin("grantline"))
                .args(["audit", "verify", "--json", "--db"])
                .arg(&db)
                .arg("--key-file")
                .arg(broker.path("audit.vkey")),
        );
        let status = proc.wait_at_most(Duration::from_secs(20)).expect("the verifier hung on a crafted database");
        assert!(!status.success(), "crafted database {i} verified");
    }
}

/// A key file that is not a file (a FIFO that never ends, a device) is
/// refused, not read forever.
#[test]
fn the_verifier_reads_only_bounded_regular_files() {
    let (broker, _) = real_key();
    for key_file in ["/dev/zero", "/dev/urandom"] {
        let mut proc = Proc::spawn(
            "grantline",
            Command::new(bin("grantline"))
                .args(["audit", "verify", "--db"])
                .arg(broker.path("audit.db"))
                .args(["--key-file", key_file]),
        );
        let status = proc.wait_at_most(Duration::from_secs(20)).expect("the verifier read a device forever");
        assert_eq!(status.code(), Some(66), "{key_file}");
    }
}

/// The follow-up review's forgery: after a rotation k1 -> k2 the retired key
/// k1 may leak. A log its holder writes — started by k1, ending under k1, or
/// ending with a rotation to k2 that k2 never signed anything after — must
/// not verify under the key history `audit.vkeys`, with --db or --anchor.
#[test]
fn a_retired_key_cannot_forge_a_log_the_key_history_accepts() {
    let (mut broker, _) = real_key();
    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    broker.proc.wait();
    let retired = SignerKey::parse(&std::fs::read_to_string(broker.path("audit.key")).unwrap()).unwrap();
    let out = Command::new(bin("grantline"))
        .args(["audit", "rotate-key", "--state-dir"])
        .arg(broker.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", grantline_tests::stderr(&out));
    let history = broker.path("audit.vkeys");
    let current =
        grantline_proto::audit::VerifierKey::parse(&std::fs::read_to_string(broker.path("audit.vkey")).unwrap())
            .unwrap();
    // The real log verifies under the history.
    let (code, v) = verify(&["verify", "--db"], &[&broker.path("audit.db"), Path::new("--key-file"), &history]);
    assert_eq!(code, Some(0), "{v}");

    let origin = current.name().to_owned();
    let genesis = Event::Genesis { vkey: retired.verifier().to_string(), software: "forged".into() };
    let under_k1: Vec<Event> = std::iter::once(genesis.clone()).chain((1..4).map(denial)).collect();
    let mut rotating = under_k1.clone();
    rotating.push(Event::KeyRotation { new_vkey: current.to_string() });
    for (name, events) in [("ends under the retired key", under_k1), ("ends with an unendorsed rotation", rotating)] {
        let forged = forge(&origin, &events, &retired);
        let note = checkpoint(&forged, &origin, &retired);
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        write_db(&db, &forged, &note);
        let (code, v) = verify(&["verify", "--db"], &[&db, Path::new("--key-file"), &history]);
        assert_eq!(code, Some(65), "{name}: {v}");
        let anchor = dir.path().join("anchor");
        write_anchor(&anchor, &forged, &note);
        let (code, v) = verify(&["verify", "--anchor"], &[&anchor, Path::new("--key-file"), &history]);
        assert_eq!(code, Some(65), "{name}: {v}");
    }
}

/// The follow-up review's crafted databases: a schema past the first 1,000
/// objects, generated columns and defaults that make a small file read as
/// gigabytes, a virtual table spelled to dodge a textual check.
#[test]
fn crafted_schemas_that_compute_or_hide_are_refused() {
    let (broker, _) = real_key();
    let dir = tempfile::tempdir().unwrap();
    let mut many = String::new();
    for i in 0..1100 {
        many.push_str(&format!("CREATE TABLE t{i} (x);"));
    }
    many.push_str("CREATE TABLE entries (seq INTEGER PRIMARY KEY, hash BLOB, entry BLOB, signature BLOB);");
    let crafted = [
        ("many objects", many),
        (
            "generated note",
            "CREATE TABLE entries (seq INTEGER PRIMARY KEY, hash BLOB, entry BLOB, signature BLOB); \
             CREATE TABLE checkpoints (size INTEGER PRIMARY KEY, time_ms INT, note TEXT AS (hex(zeroblob(32768)))); \
             INSERT INTO checkpoints (size, time_ms) VALUES (1, 0), (2, 0);"
                .to_owned(),
        ),
        (
            "default entry",
            "CREATE TABLE entries (seq INTEGER PRIMARY KEY, hash BLOB, entry BLOB DEFAULT (zeroblob(100000000)), signature BLOB); \
             INSERT INTO entries (seq, hash, signature) VALUES (0, x'00', x'00');"
                .to_owned(),
        ),
    ];
    for (name, sql) in crafted {
        let db = dir.path().join(format!("{}.db", name.replace(' ', "-")));
        rusqlite::Connection::open(&db).unwrap().execute_batch(&sql).unwrap();
        let (code, v) = verify(&["verify", "--db"], &[&db, Path::new("--key-file"), &broker.path("audit.vkey")]);
        assert_ne!(code, Some(0), "{name}: {v}");
        let text = v.to_string();
        assert!(text.contains("crafted") || text.contains("computes"), "{name}: {v}");
    }
}

/// Second review of the shared anchor: a writer of the anchor put an older
/// checkpoint back, to hide the grants after it, and `verify --anchor`
/// passed (the old checkpoint is signed by the broker's key). The bundles
/// published before the newer checkpoint give it away.
#[test]
fn an_older_checkpoint_put_back_in_the_anchor_is_caught() {
    let (broker, _) = real_key();
    let agent = grantline_tests::Agent::start(&broker, "node-1");
    let (anchor, vkey, db) = (broker.path("anchor"), broker.path("audit.vkey"), broker.path("audit.db"));
    let out_dir = tempfile::tempdir().unwrap();
    let grant_and_publish = |san: &str| {
        let got = agent.get(&["x509", "--role", "dev", "--san", san, "--out", out_dir.path().to_str().unwrap()]);
        assert!(got.status.success(), "{}", grantline_tests::stderr(&got));
        let since = std::time::Instant::now();
        loop {
            let (_, local) = broker.verify();
            let (_, published) = verify(&["verify", "--anchor"], &[&anchor, Path::new("--key-file"), &vkey]);
            if published["ok"] == true && published["entries"] == local["entries"] {
                break std::fs::read(anchor.join("checkpoint")).unwrap();
            }
            assert!(since.elapsed() < Duration::from_secs(20), "the anchor lags: {published}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let older = grant_and_publish("a.example.com");
    grant_and_publish("hidden.example.com");
    std::fs::write(anchor.join("checkpoint"), &older).unwrap();
    for with_db in [false, true] {
        let mut extra = vec![anchor.as_path(), Path::new("--key-file"), vkey.as_path()];
        if with_db {
            extra.extend([Path::new("--db"), db.as_path()]);
        }
        let (code, v) = verify(&["verify", "--anchor"], &extra);
        assert_ne!(code, Some(0), "an older checkpoint put back verified (--db: {with_db}): {v}");
        assert!(v["reason"].as_str().unwrap_or_default().contains("past its checkpoint"), "{v}");
    }
}
