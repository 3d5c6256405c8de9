//! The audit log against real tampering of the SQLite file, and against
//! SIGKILL during a burst of grants.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use grantline_proto::audit::Event;
use grantline_tests::{pem_fingerprint, stderr, verify_db, Agent, Broker};

/// A broker with some history, stopped cleanly, and a copy of its log.
fn log_with_history() -> (Broker, tempfile::TempDir) {
    let broker = Broker::start();
    let agent = Agent::start(&broker, "n1");
    for i in 0..4 {
        let out = tempfile::tempdir().unwrap();
        let san = format!("svc{i}.example.com");
        let got = agent.get(&["x509", "--role", "dev", "--out", out.path().to_str().unwrap(), "--san", &san]);
        assert!(got.status.success(), "{}", stderr(&got));
    }
    let copy = tempfile::tempdir().unwrap();
    // VACUUM INTO gives a consistent single-file copy of a WAL database.
    let conn = rusqlite::Connection::open(broker.path("audit.db")).unwrap();
    conn.execute("VACUUM INTO ?1", [copy.path().join("audit.db").to_str().unwrap()]).unwrap();
    (broker, copy)
}

/// Opens a copy as an attacker would: dropping the append-only triggers first.
fn tamper(db: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch("DROP TRIGGER entries_no_update; DROP TRIGGER entries_no_delete;").unwrap();
    conn.execute_batch(sql).unwrap();
}

fn fresh_copy(src: &Path) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(src, d.path().join("audit.db")).unwrap();
    d
}

#[test]
fn verifier_accepts_untouched_log_and_names_each_kind_of_tampering() {
    let (broker, copy) = log_with_history();
    let db = copy.path().join("audit.db");
    let key = broker.path("audit.vkey");

    let (ok, v) = verify_db(&db, &key);
    assert!(ok, "untouched log rejected: {v}");
    let n = v["entries"].as_u64().unwrap();
    assert!(n >= 6, "{v}"); // genesis, enrollment, four grants

    // One event byte edited in place.
    let edited = fresh_copy(&db);
    tamper(
        &edited.path().join("audit.db"),
        "UPDATE entries SET entry = CAST(replace(CAST(entry AS TEXT), 'svc', 'svx') AS BLOB) WHERE seq = 4",
    );
    let (ok, v) = verify_db(&edited.path().join("audit.db"), &key);
    assert!(!ok);
    assert_eq!(v["seq"], 4, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("does not match"), "{v}");

    // An entry deleted.
    let deleted = fresh_copy(&db);
    tamper(&deleted.path().join("audit.db"), "DELETE FROM entries WHERE seq = 3");
    let (ok, v) = verify_db(&deleted.path().join("audit.db"), &key);
    assert!(!ok);
    assert_eq!(v["seq"], 4, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("gap"), "{v}");

    // Two entries swapped (their rows exchange contents).
    let swapped = fresh_copy(&db);
    tamper(
        &swapped.path().join("audit.db"),
        "UPDATE entries SET seq = -1 WHERE seq = 3; UPDATE entries SET seq = 3 WHERE seq = 4; UPDATE entries SET seq = 4 WHERE seq = -1;",
    );
    let (ok, v) = verify_db(&swapped.path().join("audit.db"), &key);
    assert!(!ok);
    assert_eq!(v["seq"], 3, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("says it is seq 4"), "{v}");

    // A wrong public key: another broker's.
    let other = Broker::start();
    let (ok, v) = verify_db(&db, &other.path("audit.vkey"));
    assert!(!ok);
    assert_eq!(v["seq"], 0, "{v}");

    // The human form names the seq and exits 65.
    let out = Command::new(grantline_tests::bin("grantline"))
        .args(["audit", "verify", "--db"])
        .arg(deleted.path().join("audit.db"))
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("FAILED at seq 4: gap"), "{:?}", out);
}

#[test]
fn sigkill_during_a_burst_loses_no_issued_credential() {
    let mut broker = Broker::start();
    let mut agent = Agent::start(&broker, "burst");
    let outs = tempfile::tempdir().unwrap();

    // Four workers request certificates as fast as they can; the broker is
    // killed once a batch of them has succeeded.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let agent_socket = agent.socket();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let stop = stop.clone();
            let done_tx = done_tx.clone();
            let socket = agent_socket.clone();
            let base = outs.path().to_owned();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let dir = base.join(format!("w{w}-{i}"));
                    i += 1;
                    let out = Command::new(grantline_tests::bin("grantline-agent"))
                        .args(["get", "x509", "--role", "dev", "--out"])
                        .arg(&dir)
                        .arg("--socket")
                        .arg(&socket)
                        .output()
                        .unwrap();
                    if out.status.success() {
                        got.push(dir);
                        let _ = done_tx.send(());
                    }
                }
                got
            })
        })
        .collect();
    for _ in 0..24 {
        done_rx.recv().unwrap();
    }
    broker.kill9_and_restart();
    agent.wait_connected();
    // A few more after the restart, proving service resumed.
    for _ in 0..4 {
        done_rx.recv().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let received: Vec<_> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(received.len() >= 28);

    let (ok, v) = broker.verify();
    assert!(ok, "log does not verify after SIGKILL: {v}");
    let logged: std::collections::HashSet<String> = broker
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Grant { fingerprint, .. } => Some(fingerprint),
            _ => None,
        })
        .collect();
    for dir in &received {
        let fp = pem_fingerprint(&dir.join("cert.pem"));
        assert!(logged.contains(&fp), "credential {} ({fp}) has no audit entry", dir.display());
    }
}

#[test]
fn a_locked_audit_database_fails_grants_closed_and_service_recovers() {
    let broker = Broker::start();
    let agent = Agent::start(&broker, "locked");
    // Another process holds the database's write lock (as a backup tool or a
    // wedged disk would): the broker cannot commit, so it must not issue.
    let conn = rusqlite::Connection::open(broker.path("audit.db")).unwrap();
    conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["x509", "--role", "dev", "--out", out.path().to_str().unwrap()]);
    assert_eq!(got.status.code(), Some(69), "{}", stderr(&got));
    assert!(stderr(&got).contains("UNAVAILABLE") && stderr(&got).contains("nothing was issued"), "{}", stderr(&got));
    assert!(!out.path().join("cert.pem").exists(), "a credential left the broker without a durable entry");
    conn.execute_batch("ROLLBACK").unwrap();
    drop(conn);

    // The lock is gone: the next grant succeeds with no restart, and the log is sound.
    let got = agent.get(&["x509", "--role", "dev", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
    let fp = pem_fingerprint(&out.path().join("cert.pem"));
    assert!(broker.events().iter().any(|e| matches!(e, Event::Grant { fingerprint, .. } if *fingerprint == fp)));
}

/// `grantline audit verify-fleet --json --log DB KEY ...`: exit code and JSON.
fn verify_fleet(logs: &[(&Path, &Path)]) -> (Option<i32>, serde_json::Value) {
    let mut cmd = Command::new(grantline_tests::bin("grantline"));
    cmd.args(["audit", "verify-fleet", "--json"]);
    for (db, key) in logs {
        cmd.arg("--log").arg(db).arg(key);
    }
    let out = cmd.output().unwrap();
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}{}", String::from_utf8_lossy(&out.stdout), stderr(&out)));
    (out.status.code(), json)
}

#[test]
fn the_logs_of_several_brokers_verify_together_each_under_its_own_key_and_origin() {
    // Two brokers, two origins (the dev one's and the configured one's).
    let mut a = Broker::start();
    let mut b = Broker::start_config("", "");
    for broker in [&mut a, &mut b] {
        broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(broker.proc.wait().success());
    }
    let (a_db, a_key, b_db, b_key) =
        (a.path("audit.db"), a.path("audit.vkey"), b.path("audit.db"), b.path("audit.vkey"));
    let alone = |db: &Path, key: &Path| verify_db(db, key).1["entries"].as_u64().unwrap();

    let (code, v) = verify_fleet(&[(&a_db, &a_key), (&b_db, &b_key)]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["entries"].as_u64().unwrap(), alone(&a_db, &a_key) + alone(&b_db, &b_key), "{v}");
    assert_eq!(v["logs"][1]["origin"], "grantline.test/broker", "{v}");
    assert!(v["first_time_ms"].as_i64().unwrap() <= v["last_time_ms"].as_i64().unwrap(), "{v}");

    // One timeline of both: every entry once, earliest first, each log in order.
    let out = Command::new(grantline_tests::bin("grantline"))
        .args(["audit", "verify-fleet", "--timeline", "--log"])
        .args([&a_db, &a_key])
        .arg("--log")
        .args([&b_db, &b_key])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len() as u64, alone(&a_db, &a_key) + alone(&b_db, &b_key));
    assert!(lines.windows(2).all(|w| w[0]["time_ms"].as_i64() <= w[1]["time_ms"].as_i64()), "not in time order");
    for origin in ["grantline.test/broker", v["logs"][0]["origin"].as_str().unwrap()] {
        let seqs: Vec<u64> =
            lines.iter().filter(|l| l["origin"] == origin).map(|l| l["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "{origin}");
        assert!(!seqs.is_empty(), "{origin}");
    }
    assert_eq!(lines[0]["event"]["type"], "genesis", "{}", lines[0]);
    assert!(stderr(&out).contains("OK: 2 logs"), "{}", stderr(&out));

    // A log checked against another broker's key fails, and says which log.
    let (code, v) = verify_fleet(&[(&a_db, &b_key), (&b_db, &b_key)]);
    assert_eq!(code, Some(65), "{v}");
    let refused = Command::new(grantline_tests::bin("grantline"))
        .args(["audit", "verify-fleet", "--timeline", "--log"])
        .args([&a_db, &b_key])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(65));
    assert!(refused.stdout.is_empty(), "a timeline of an unverified log was printed");
    let problem = v["problems"][0].as_str().unwrap();
    assert!(problem.starts_with(a_db.to_str().unwrap()), "{v}");

    // The same log given twice is not two brokers.
    let copy = fresh_copy(&a_db);
    let (code, v) = verify_fleet(&[(&a_db, &a_key), (&copy.path().join("audit.db"), &a_key)]);
    assert_eq!(code, Some(65), "{v}");
    assert!(v["problems"][0].as_str().unwrap().contains("2 logs claim origin grantline-dev/"), "{v}");

    // A key file that is not there is named.
    let (code, v) = verify_fleet(&[(&a_db, Path::new("/nonexistent/audit.vkey"))]);
    assert_eq!(code, Some(66), "{v}");
    assert!(v["error"].as_str().unwrap().contains("/nonexistent/audit.vkey"), "{v}");
}
