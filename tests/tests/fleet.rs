//! A fleet of three brokers on one PostgreSQL server (RFD 0010): join
//! tokens shared and single-use across brokers, revocation at one broker
//! closing the node's connection at another, agents failing over when a
//! broker is killed, and the database going away and coming back.

use std::time::{Duration, Instant};

use grantline_tests::fleet::{enroll, set_brokers, Fleet};
use grantline_tests::openbao::{database_secret, OpenBao};
use grantline_tests::{events, pem_fingerprint, stderr, verify_db};

fn ok(out: &std::process::Output, what: &str) {
    assert!(out.status.success(), "{what} failed: {}", stderr(out));
}

#[test]
fn a_token_made_at_one_broker_enrolls_once_anywhere_in_the_fleet() {
    let fleet = Fleet::start(3, "");
    let [a, b, c] = &fleet.brokers[..] else { unreachable!() };
    let token = a.new_token(&[]);
    let (_agent, out) = enroll(&b.addr, &b.path("ca.pem"), &token, "web-1");
    ok(&out, "enrolling at B with A's token");
    let (_again, out) = enroll(&c.addr, &c.path("ca.pem"), &token, "web-2");
    assert!(!out.status.success(), "a token was used twice across the fleet");
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));

    // Two enrollments racing with one token at two brokers: one wins.
    for round in 0..3 {
        let token = a.new_token(&[]);
        let (bt, ct) = (b.addr.clone(), c.addr.clone());
        let (bca, cca) = (b.path("ca.pem"), c.path("ca.pem"));
        let (t1, t2) = (token.clone(), token);
        let one = std::thread::spawn(move || enroll(&bt, &bca, &t1, &format!("race-{round}-b")));
        let two = std::thread::spawn(move || enroll(&ct, &cca, &t2, &format!("race-{round}-c")));
        let outcomes = [one.join().unwrap().1, two.join().unwrap().1];
        let won = outcomes.iter().filter(|o| o.status.success()).count();
        assert_eq!(won, 1, "round {round}: {} enrollments with one token", won);
    }
    // Every broker lists the fleet's nodes.
    let listed = String::from_utf8(c.admin(&["nodes", "list", "--json"]).stdout).unwrap();
    assert!(listed.contains("\"web-1\""), "a node enrolled at B is not listed at C: {listed}");
}

/// What the fleet's policy adds for database credentials from OpenBao.
const DATABASE_ALLOW: &str = r#"
[[rule.allow]]
kinds = ["secret"]
roles = ["readonly"]
max_ttl = "10m"
path = "database/creds/{role}"
"#;

#[test]
fn a_revocation_at_one_broker_closes_the_node_at_another_within_a_second() {
    let bao = OpenBao::start();
    let (role_id, secret_id) = bao.setup_broker_approle();
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("secret-id");
    grantline_proto::files::write_secret(&secret_file, secret_id.as_bytes()).unwrap();
    let vault = format!(
        "[vault]\naddress = \"{}\"\napprole = {{ role_id = \"{role_id}\", secret_id_file = \"{}\" }}\nx509 = \"embedded\"\nssh = \"embedded\"\n",
        bao.addr,
        secret_file.display()
    );
    let fleet = Fleet::start_with(3, &format!("{}{DATABASE_ALLOW}", grantline_tests::fleet::POLICY), &vault);
    bao.setup_database(&fleet.pg);
    let [a, b, c] = &fleet.brokers[..] else { unreachable!() };
    let token = a.new_token(&[]);
    let (mut agent, out) = enroll(&c.addr, &c.path("ca.pem"), &token, "db-1");
    ok(&out, "enrolling at C");
    agent.run();
    let out =
        agent.get(&["x509", "--role", "dev", "--san", "db-1.example.com", "--out", agent.dir.path().to_str().unwrap()]);
    ok(&out, "a grant at C");
    // Database credentials from OpenBao, leased through C.
    let (user, password, _lease) = database_secret(&agent);
    assert!(fleet.pg.psql(&user, &password, "SELECT 1").status.success());
    // Any broker shows where the node is connected (brokers report their
    // connections each second).
    let shown = Instant::now();
    loop {
        let listed = String::from_utf8(b.admin(&["nodes", "list", "--json"]).stdout).unwrap();
        if listed.contains("grantline.test/broker-2") {
            break;
        }
        assert!(shown.elapsed() < Duration::from_secs(5), "B does not show where db-1 is connected: {listed}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let socket = a.admin_socket();
    let socket = socket.to_str().unwrap();
    let asked = Instant::now();
    let revoked = std::thread::scope(|s| {
        let revoke = s.spawn(|| {
            grantline_tests::grantline(
                &["nodes", "revoke", "db-1", "--reason", "fleet test", "--json", "--socket", socket],
                &[],
            )
        });
        agent.wait_line("grantline-agent revoked:");
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(1), "C closed the revoked node's connection after {took:?}");
        revoke.join().unwrap()
    });
    ok(&revoked, "revoking at A");
    // The lease C took is revoked, once, by A: the database user is gone.
    let report: serde_json::Value = serde_json::from_slice(&revoked.stdout).unwrap();
    assert_eq!(report["leases_revoked"], 1, "{report}");
    assert!(!fleet.pg.psql(&user, &password, "SELECT 1").status.success(), "the revoked node's credentials log in");
    // Refused at every broker: the same identity pointed at B.
    agent.proc = None;
    set_brokers(&agent, &b.addr);
    let mut again = grantline_tests::Agent::run_unconnected(agent);
    again.wait_line("grantline-agent revoked:");
    // Audited once, by the broker that revoked, as is the lease's revocation.
    let count = |broker: &grantline_tests::Broker, kind: &str| {
        events(&broker.path("audit.db")).iter().filter(|e| e.type_name() == kind).count()
    };
    assert_eq!((count(a, "node_revocation"), count(b, "node_revocation"), count(c, "node_revocation")), (1, 0, 0));
    assert_eq!((count(a, "lease_revocation"), count(b, "lease_revocation"), count(c, "lease_revocation")), (1, 0, 0));
}

#[test]
fn agents_fail_over_when_a_broker_is_killed_and_every_grant_is_logged() {
    let mut fleet = Fleet::start(3, "");
    let all = fleet.addresses();
    let token = fleet.brokers[0].new_token(&[]);
    let (mut agent, out) = enroll(&all, &fleet.brokers[0].path("ca.pem"), &token, "app-1");
    ok(&out, "enrolling with the fleet's addresses");
    agent.run();
    let out_dir = agent.dir.path().to_str().unwrap().to_owned();
    let mut granted = Vec::new();
    let mut grant = |agent: &grantline_tests::Agent, n: usize| {
        let out = agent.get(&["x509", "--role", "dev", "--san", &format!("app-{n}.example.com"), "--out", &out_dir]);
        ok(&out, "a grant");
        granted.push(pem_fingerprint(&agent.dir.path().join("cert.pem")));
    };
    grant(&agent, 0);
    // The shared anchor holds every broker's log; one never started is missing.
    let brokers = fleet.root.path().join("brokers");
    let keys: String = fleet.brokers.iter().map(|b| std::fs::read_to_string(b.path("audit.vkey")).unwrap()).collect();
    std::fs::write(&brokers, &keys).unwrap();
    let since = Instant::now();
    while fleet.verify_anchor(&brokers, "1m")["ok"] != true {
        assert!(since.elapsed() < Duration::from_secs(10), "{}", fleet.verify_anchor(&brokers, "1m"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let absent = grantline_proto::audit::SignerKey::generate("grantline.test/broker-9").unwrap();
    std::fs::write(&brokers, format!("{keys}{}\n", absent.verifier())).unwrap();
    let v = fleet.verify_anchor(&brokers, "1m");
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["logs"].as_array().unwrap().len(), 3, "{v}");
    assert!(v["problems"][0].as_str().unwrap().contains("broker grantline.test/broker-9 is missing"), "{v}");
    std::fs::write(&brokers, &keys).unwrap();
    // A log in the anchor that the brokers file does not name is reported.
    let stray = fleet.anchor().join("stray");
    std::fs::create_dir(&stray).unwrap();
    std::fs::copy(fleet.anchor().join("grantline.test_2fbroker-0").join("checkpoint"), stray.join("checkpoint"))
        .unwrap();
    let v = fleet.verify_anchor(&brokers, "1m");
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["problems"][0].as_str().unwrap().contains("under stray/ that the brokers file does not name"), "{v}");
    std::fs::remove_dir_all(&stray).unwrap();
    // Kill the broker the agent holds, whichever it is.
    let since = Instant::now();
    let held = loop {
        let listed = String::from_utf8(fleet.brokers[1].admin(&["nodes", "list", "--json"]).stdout).unwrap();
        let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
        let to = v[0]["connected_to"][0].as_str().unwrap_or_default().to_owned();
        if let Some(i) = (0..3).find(|i| to == format!("grantline.test/broker-{i}")) {
            break i;
        }
        assert!(since.elapsed() < Duration::from_secs(5), "the node is not listed where connected: {listed}");
        std::thread::sleep(Duration::from_millis(100));
    };
    fleet.brokers[held].proc.kill9();
    agent.wait_connected();
    for n in 1..4 {
        grant(&agent, n);
    }
    // Every acknowledged grant is in some broker's log, and each log verifies.
    let mut logged = Vec::new();
    for b in &fleet.brokers {
        let (verified, report) = verify_db(&b.path("audit.db"), &b.path("audit.vkey"));
        assert!(verified, "a broker's log does not verify: {report}");
        for e in events(&b.path("audit.db")) {
            if let grantline_proto::audit::Event::Grant { fingerprint, .. } = e {
                logged.push(fingerprint);
            }
        }
    }
    for fp in &granted {
        assert!(logged.contains(fp), "grant {fp} acknowledged to the agent is in no broker's log");
    }
    // From the anchor alone, verify-fleet passes: every log verifies (the
    // killed broker's up to what it published; killed between publishing
    // entries and their checkpoint, it is reported as behind them).
    let v = fleet.verify_anchor(&brokers, "1h");
    let behind = v["logs"].as_array().unwrap().iter().any(|l| {
        l["anchor"].as_str().unwrap().contains(&format!("broker-{held}"))
            && l["reason"].as_str().is_some_and(|r| r.contains("past its checkpoint"))
    });
    assert!(v["ok"] == true || behind, "verify-fleet over the shared anchor after the kill: {v}");
    // The killed broker is named as no longer publishing once its checkpoint
    // is older than the bound (the others write theirs every second).
    let stopped = format!("broker grantline.test/broker-{held} has stopped publishing");
    let since = Instant::now();
    let v = loop {
        let v = fleet.verify_anchor(&brokers, "4s");
        if v["problems"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().contains(&stopped)) {
            break v;
        }
        assert!(since.elapsed() < Duration::from_secs(20), "the killed broker is not named: {v}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(v["ok"], false, "{v}");
    // Only the killed broker is a problem (killed between publishing entries
    // and their checkpoint, its log is also reported as behind them).
    let killed = format!("broker-{held}");
    assert!(v["problems"].as_array().unwrap().iter().all(|p| p.as_str().unwrap().contains(&killed)), "{v}");
    for l in v["logs"].as_array().unwrap() {
        let reason = l["reason"].as_str().unwrap_or_default();
        let here = l["anchor"].as_str().unwrap().contains(&killed);
        assert!(l["ok"] == true || (here && reason.contains("past its checkpoint")), "{v}");
    }
}

/// The load generator's failover (RFD 0010, measured at 10,000 agents by
/// `grantline-fleet-bench failover`), small: every agent of the killed
/// broker is granted again at another, and no acknowledged grant is lost.
#[test]
fn the_agents_of_a_killed_broker_are_granted_at_the_others_and_no_grant_is_lost() {
    let mut fleet = Fleet::start(3, "");
    let v = grantline_tests::failover::kill_one_of(&mut fleet, 60);
    assert_eq!((v["granted_before"].as_u64(), v["on_killed_broker"].as_u64()), (Some(60), Some(20)), "{v}");
    assert_eq!(v["regranted"], 20, "{v}");
    assert_eq!(v["acknowledged"], 80, "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["errors_after"], serde_json::json!({}), "{v}");
}

#[test]
fn without_postgres_grants_go_on_within_the_bound_then_stop_and_recover() {
    let mut fleet = Fleet::start(1, "max_staleness = \"3s\"\n");
    let token = fleet.brokers[0].new_token(&[]);
    let (mut agent, out) = enroll(&fleet.brokers[0].addr, &fleet.brokers[0].path("ca.pem"), &token, "cache-1");
    ok(&out, "enrolling");
    agent.run();
    let dir = agent.dir.path().to_str().unwrap().to_owned();
    let get = |agent: &grantline_tests::Agent| agent.get(&["x509", "--role", "dev", "--out", &dir]);
    ok(&get(&agent), "a grant with the database up");
    fleet.pg.stop();
    let stopped = Instant::now();
    // Grants to an enrolled node go on from the cache within the bound.
    ok(&get(&agent), "a grant right after the database stopped");
    // What needs the database fails closed, saying so.
    let out = grantline_tests::grantline(
        &["token", "create", "--state-dir", fleet.brokers[0].dir.path().to_str().unwrap()],
        &[],
    );
    assert!(!out.status.success(), "a join token was made without the database");
    // Past the bound, grants stop, refused with the bound's reason. The
    // first one to fail may instead be in flight when the stale broker
    // closes its agents' connections (once, as it does then): it is counted
    // as the stop, and the refusal is the next one's.
    let mut stopped_after = None;
    let refused = loop {
        let out = get(&agent);
        if !out.status.success() {
            stopped_after.get_or_insert(stopped.elapsed());
            if stderr(&out).contains("has not heard from the fleet's database") {
                break stderr(&out);
            }
        }
        assert!(stopped.elapsed() < Duration::from_secs(20), "no refusal naming the bound: {}", stderr(&out));
        std::thread::sleep(Duration::from_millis(250));
    };
    // The bound runs from the last heartbeat, at most a second before the stop.
    assert!(stopped_after.unwrap() >= Duration::from_secs(2), "grants stopped before the bound: {refused}");
    // The database returns: service recovers by itself.
    fleet.pg.start_again();
    let back = Instant::now();
    while !get(&agent).status.success() {
        assert!(back.elapsed() < Duration::from_secs(30), "grants did not resume after the database returned");
        std::thread::sleep(Duration::from_millis(250));
    }
    ok(&get(&agent), "a grant after recovery");
}

/// Review finding: a renewal synced from another broker was taken as not
/// yet used, so a leaked previous identity could renew at a broker that had
/// not seen the new one and take the node over; and an unpinned token could
/// overwrite a name enrolled at another broker a moment before. The store
/// now checks both, under the row lock, for the whole fleet.
#[test]
fn the_shared_store_refuses_what_only_a_stale_broker_would_allow() {
    use grantline_daemon::state::{NodeRecord, PgConfig, PgStore, Replace, StateStore, ThisBroker, Upsert};
    let pg = grantline_tests::postgres::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("pw");
    grantline_proto::files::write_secret(&password, grantline_tests::postgres::SUPERUSER_PASSWORD.as_bytes()).unwrap();
    let cfg = PgConfig {
        url: pg.url(),
        password_file: Some(password),
        ca_file: None,
        pool_size: 2,
        max_staleness: Duration::from_secs(30),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let me = ThisBroker {
            id: "grantline.test/store".into(),
            node_ca: String::new(),
            node_ca_endorsement: String::new(),
            audit_key: "k".into(),
        };
        let store = PgStore::open(&cfg, me).await.unwrap();
        let node = |serial: &str, previous: &str| NodeRecord {
            name: "n1".into(),
            labels: Default::default(),
            serial: serial.into(),
            previous_serial: previous.into(),
            current_seen: false,
            not_after: i64::MAX,
            revoked: false,
            revoked_at: 0,
            last_seen: 0,
            version: 0,
        };
        assert!(matches!(store.upsert_node(&node("01", ""), Replace::Nothing, 1).await.unwrap(), Upsert::Stored(_)));
        assert_eq!(
            store.upsert_node(&node("99", ""), Replace::Nothing, 2).await.unwrap(),
            Upsert::Conflict,
            "an unpinned enrollment overwrote an enrolled name"
        );
        // Renewal 01 -> 02; until 02 is used, 01 may renew again (its reply may have been lost).
        assert!(matches!(
            store.upsert_node(&node("02", "01"), Replace::From("01"), 3).await.unwrap(),
            Upsert::Stored(_)
        ));
        assert!(!store.mark_current_seen("n1", "01").await.unwrap(), "a replaced identity was marked as the current");
        assert!(store.mark_current_seen("n1", "02").await.unwrap());
        assert_eq!(
            store.upsert_node(&node("03", "01"), Replace::From("01"), 4).await.unwrap(),
            Upsert::Conflict,
            "a previous identity renewed after the current one was used"
        );
        assert!(matches!(
            store.upsert_node(&node("03", "02"), Replace::From("02"), 5).await.unwrap(),
            Upsert::Stored(_)
        ));
        assert!(store.revoke_node("n1", 6).await.unwrap());
        assert_eq!(store.upsert_node(&node("04", ""), Replace::Any, 7).await.unwrap(), Upsert::Revoked);
        let stored = store.nodes().await.unwrap();
        assert_eq!((stored[0].serial.as_str(), stored[0].revoked), ("03", true));
    });
    // Not even SQL undoes a revocation.
    let undo = pg.psql("postgres", grantline_tests::postgres::SUPERUSER_PASSWORD, "UPDATE nodes SET revoked_at = NULL");
    assert!(!undo.status.success(), "a revocation was cleared in the database");
    assert!(
        String::from_utf8_lossy(&undo.stderr).contains("never undone"),
        "{}",
        String::from_utf8_lossy(&undo.stderr)
    );
}

/// Review finding: a broker with `[state] url` but a state directory that
/// never joined the fleet started, and every other broker refused its
/// nodes. It now refuses to start, naming the command.
#[test]
fn a_broker_that_did_not_join_the_fleet_refuses_to_start() {
    let fleet = Fleet::start(0, "");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.toml"), grantline_tests::fleet::POLICY).unwrap();
    let cfg = dir.path().join("grantlined.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"{d}\"\npolicy = \"{d}/policy.toml\"\norigin = \"grantline.test/loner\"\n{}\n[admin]\nenabled = false\n[metrics]\nenabled = false\n",
            fleet.extra,
            d = dir.path().display()
        ),
    )
    .unwrap();
    let out =
        std::process::Command::new(grantline_tests::bin("grantlined")).arg("--config").arg(&cfg).output().unwrap();
    assert!(!out.status.success(), "a broker outside the fleet started on the fleet's database");
    assert!(stderr(&out).contains("fleet join"), "{}", stderr(&out));
}
