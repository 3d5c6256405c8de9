//! Packages and systemd integration (RFD 0007): the .deb files install on
//! this machine and serve end to end, the .rpm files carry the same files,
//! modes and scripts, the units verify and are sandboxed, and the broker and
//! agent speak sd_notify.
//!
//! `packaging/build.sh` (run by scripts/test.sh) builds the packages first.
//! The package test installs them system-wide, as root, so it is one test
//! that runs its steps in order.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use grantline_tests::{bin, stderr, Broker, Proc};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The one package file of `name` with extension `ext` in target/packages.
fn package(name: &str, ext: &str) -> PathBuf {
    let dir = repo().join("target/packages");
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{} ({e}); build the packages first: packaging/build.sh", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let f = p.file_name().unwrap().to_str().unwrap();
            f.ends_with(ext) && (f.starts_with(&format!("{name}_")) || f.starts_with(&format!("{name}-0")))
        })
        .collect();
    assert_eq!(found.len(), 1, "expected one {name} {ext} in {}: {found:?}", dir.display());
    found[0].clone()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode_owner(path: &str) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

fn id_of(kind: &str, name: &str) -> u32 {
    let out = run(Command::new("getent").args([kind, name]));
    text(&out).split(':').nth(2).unwrap().parse().unwrap()
}

/// Files, modes and scripts the two formats must agree on: (path, mode).
const BROKER_FILES: &[(&str, u32)] = &[
    ("/usr/bin/grantlined", 0o755),
    ("/usr/bin/grantline", 0o755),
    ("/usr/share/man/man8/grantlined.8.gz", 0o644),
    ("/usr/share/man/man1/grantline.1.gz", 0o644),
    ("/etc/grantline/grantlined.toml", 0o644),
    ("/etc/grantline/policy.toml", 0o644),
    ("/usr/lib/sysusers.d/grantline.conf", 0o644),
];
const AGENT_FILES: &[(&str, u32)] = &[
    ("/usr/bin/grantline-agent", 0o755),
    ("/usr/share/man/man8/grantline-agent.8.gz", 0o644),
    ("/etc/grantline/agent.toml", 0o644),
    ("/usr/lib/sysusers.d/grantline-agent.conf", 0o644),
];

const POLICY: &str = r#"# edited by the admin
[[rule]]
name = "web"
[[rule.allow]]
kinds = ["x509"]
roles = ["web"]
max_ttl = "1h"
sans = ["*.example.com"]
"#;

#[test]
fn debs_install_verify_and_serve_end_to_end_and_rpms_match_them() {
    let broker_deb = package("grantline", ".deb");
    let agent_deb = package("grantline-agent", ".deb");
    // A clean slate: earlier runs on this machine are purged first.
    run(Command::new("dpkg").args(["--purge", "grantline", "grantline-agent"]));
    run(Command::new("dpkg").arg("-i").arg(&broker_deb).arg(&agent_deb));

    // The user and group, the state directories, the files and their modes.
    let (uid, gid) = (id_of("passwd", "grantline"), id_of("group", "grantline"));
    assert_eq!(mode_owner("/var/lib/grantline"), (0o700, uid, gid));
    assert_eq!(mode_owner("/var/lib/grantline-agent"), (0o700, 0, 0));
    for (path, mode) in BROKER_FILES.iter().chain(AGENT_FILES) {
        assert_eq!(mode_owner(path), (*mode, 0, 0), "{path}");
    }
    let conffiles = text(&run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}\n", "grantline"])));
    assert!(conffiles.contains("/etc/grantline/grantlined.toml") && conffiles.contains("/etc/grantline/policy.toml"));
    for man in ["grantlined.8.gz", "grantline-agent.8.gz"] {
        let page = run(Command::new("sh").arg("-c").arg(format!("zcat /usr/share/man/man8/{man} | head -5")));
        assert!(text(&page).contains(".TH"), "{man} is not a man page");
    }

    // The units verify, and the broker's sandbox meets its target.
    let units = ["/lib/systemd/system/grantlined.service", "/lib/systemd/system/grantline-agent.service"];
    for unit in units {
        let verify = Command::new("systemd-analyze").args(["verify", unit]).output().unwrap();
        assert!(verify.status.success() && verify.stderr.is_empty(), "{unit}: {}", stderr(&verify));
    }
    let security = run(Command::new("systemd-analyze").args(["security", "--offline=true", units[0]]));
    let exposure: f64 = text(&security)
        .lines()
        .find_map(|l| l.split("grantlined.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(exposure <= 1.5, "broker exposure {exposure} > 1.5:\n{}", text(&security));

    // lintian: no errors.
    let lintian =
        Command::new("lintian").args(["--fail-on", "error"]).arg(&broker_deb).arg(&agent_deb).output().unwrap();
    assert!(lintian.status.success(), "lintian: {}{}", text(&lintian), stderr(&lintian));

    // The RPMs carry the same files with the same modes, and scripts that
    // create the user and the state directories.
    for (name, files) in [("grantline", BROKER_FILES), ("grantline-agent", AGENT_FILES)] {
        let rpm = package(name, ".rpm");
        let listing = text(&run(Command::new("rpm").args(["-qlvp"]).arg(&rpm)));
        for (path, mode) in files {
            let line =
                listing.lines().find(|l| l.ends_with(path)).unwrap_or_else(|| panic!("{path} not in {name}.rpm"));
            let perms = line.split_whitespace().next().unwrap();
            let want = if *mode == 0o755 { "-rwxr-xr-x" } else { "-rw-r--r--" };
            assert_eq!(perms, want, "{name}.rpm {path}");
        }
        let configs = text(&run(Command::new("rpm").args(["-qcp"]).arg(&rpm)));
        for (path, _) in files.iter().filter(|(p, _)| p.starts_with("/etc/")) {
            assert!(configs.contains(path), "{path} is not a config file in {name}.rpm");
        }
        let scripts = text(&run(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm)));
        for want in ["postinstall", "preuninstall", "postuninstall", "systemd-sysusers", "install -d -m 0700"] {
            assert!(scripts.contains(want), "{name}.rpm scripts lack {want:?}:\n{scripts}");
        }
    }

    // The installed broker, as the grantline user with the packaged
    // configuration (and a policy the admin edited), serves the installed agent.
    std::fs::write("/etc/grantline/policy.toml", POLICY).unwrap();
    run(Command::new("install").args(["-d", "-m", "0750", "-o", "grantline", "-g", "grantline", "/run/grantline"]));
    let mut broker = Proc::spawn(
        "installed grantlined",
        Command::new("setpriv").args(["--reuid=grantline", "--regid=grantline", "--init-groups", "--"]).args([
            "/usr/bin/grantlined",
            "--config",
            "/etc/grantline/grantlined.toml",
        ]),
    );
    let addr = broker.wait_line("grantlined ready on");
    assert_eq!(addr, "0.0.0.0:7443");
    let token = text(&run(Command::new("/usr/bin/grantline").args(["token", "create", "--node", "pkg-node"])));
    let agent_dir = tempfile::tempdir().unwrap();
    run(Command::new("/usr/bin/grantline-agent")
        .args([
            "enroll",
            "--broker",
            "127.0.0.1:7443",
            "--token",
            token.trim(),
            "--ca-file",
            "/var/lib/grantline/ca.pem",
        ])
        .arg("--state-dir")
        .arg(agent_dir.path()));
    let socket = agent_dir.path().join("agent.sock");
    let mut agent = Proc::spawn(
        "installed grantline-agent",
        Command::new("/usr/bin/grantline-agent")
            .args(["run", "--config", "/etc/grantline/agent.toml", "--state-dir"])
            .arg(agent_dir.path())
            .arg("--socket")
            .arg(&socket),
    );
    agent.wait_line("grantline-agent connected to");
    let out = tempfile::tempdir().unwrap();
    run(Command::new("/usr/bin/grantline-agent")
        .args(["get", "x509", "--role", "web", "--san", "pkg-node.example.com", "--out"])
        .arg(out.path())
        .arg("--socket")
        .arg(&socket));
    assert_eq!(mode_owner("/var/lib/grantline/audit.key").0, 0o600);
    assert_eq!(mode_owner("/var/lib/grantline/audit.db").1, uid, "state belongs to the grantline user");
    broker.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(broker.wait().success());
    drop(agent);
    let verify = run(Command::new("/usr/bin/grantline").args([
        "audit",
        "verify",
        "--db",
        "/var/lib/grantline/audit.db",
        "--key-file",
        "/var/lib/grantline/audit.vkey",
    ]));
    assert!(text(&verify).starts_with("OK"), "{}", text(&verify));

    // An upgrade (here: the same version again) keeps state and the edited
    // policy; remove keeps state; purge removes it, as documented.
    run(Command::new("dpkg").args(["-i", "--force-confold"]).arg(&broker_deb));
    assert_eq!(std::fs::read_to_string("/etc/grantline/policy.toml").unwrap(), POLICY);
    assert!(Path::new("/var/lib/grantline/audit.db").exists());
    run(Command::new("dpkg").args(["--remove", "grantline"]));
    assert!(!Path::new("/usr/bin/grantlined").exists());
    assert!(Path::new("/var/lib/grantline/audit.db").exists(), "remove must keep the state");
    assert!(Path::new("/etc/grantline/policy.toml").exists(), "remove must keep the conffiles");
    run(Command::new("dpkg").args(["--purge", "grantline", "grantline-agent"]));
    assert!(!Path::new("/var/lib/grantline").exists(), "purge removes the state, as documented");
    assert!(!Path::new("/etc/grantline/policy.toml").exists());
}

/// Reads sd_notify datagrams until one equals `want`, or panics at `deadline`.
fn wait_for_notification(sock: &UnixDatagram, want: &str, deadline: Instant) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {want:?} by the deadline; got {seen:?}");
        sock.set_read_timeout(Some(left)).unwrap();
        let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("no {want:?} ({e}); got {seen:?}"));
        let msg = String::from_utf8_lossy(&buf[..n]).trim_end().to_owned();
        let done = msg.lines().any(|l| l == want);
        seen.push(msg);
        if done {
            return seen;
        }
    }
}

#[test]
fn broker_and_agent_notify_readiness_once_serving_and_ping_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    let state = dir.path().join("state");
    let mut broker = Proc::spawn(
        "grantlined",
        Command::new(bin("grantlined"))
            .args(["dev", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
            .env("NOTIFY_SOCKET", &notify)
            .env("WATCHDOG_USEC", "300000"),
    );
    let before = wait_for_notification(&sock, "READY=1", Instant::now() + Duration::from_secs(30));
    assert_eq!(before, vec!["READY=1"], "nothing precedes READY=1");
    // Once READY=1 is sent, the broker accepts connections: an agent enrolls.
    let addr = broker.wait_line("grantlined ready on");
    let ready = Broker { proc: broker, dir: grantline_tests::BrokerDir::Borrowed(state.clone()), addr };
    let (agent, out) = grantline_tests::Agent::enroll_with(&ready, &ready.join_token(), "notified");
    assert!(out.status.success(), "{}", stderr(&out));

    // WATCHDOG=1 every 150 ms (half of WATCHDOG_USEC): three in well under 2 s.
    let deadline = Instant::now() + Duration::from_secs(5);
    for _ in 0..3 {
        wait_for_notification(&sock, "WATCHDOG=1", deadline);
    }

    // The agent notifies too, once its socket is bound.
    let agent_notify = dir.path().join("agent-notify.sock");
    let agent_sock = UnixDatagram::bind(&agent_notify).unwrap();
    let _running = Proc::spawn(
        "grantline-agent",
        Command::new(bin("grantline-agent"))
            .args(["run", "--state-dir"])
            .arg(agent.dir.path())
            .arg("--socket")
            .arg(agent.socket())
            .arg("--config")
            .arg(agent.dir.path().join("agent.toml"))
            .env("NOTIFY_SOCKET", &agent_notify)
            .env("WATCHDOG_USEC", "300000"),
    );
    wait_for_notification(&agent_sock, "READY=1", Instant::now() + Duration::from_secs(30));
    assert!(std::os::unix::net::UnixStream::connect(agent.socket()).is_ok(), "READY=1 before the socket was bound");
    wait_for_notification(&agent_sock, "WATCHDOG=1", Instant::now() + Duration::from_secs(5));
}

/// The journal's native socket, which tracing-journald writes to.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

#[test]
fn logs_go_to_the_journal_with_structured_fields_when_stderr_is_the_journal() {
    // This machine runs no journald (no systemd as PID 1), so the test stands
    // in for it on the journal's socket and reads the native protocol.
    assert!(
        !Path::new(JOURNAL_SOCKET).exists(),
        "{JOURNAL_SOCKET} exists: a real journald runs here; check with journalctl SYSLOG_IDENTIFIER=grantlined instead"
    );
    std::fs::create_dir_all("/run/systemd/journal").unwrap();
    let journal = UnixDatagram::bind(JOURNAL_SOCKET).unwrap();
    struct Unbind;
    impl Drop for Unbind {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(JOURNAL_SOCKET);
        }
    }
    let _unbind = Unbind;

    // The broker inherits our stderr; JOURNAL_STREAM names its device and
    // inode, as systemd does for StandardError=journal.
    let dir = tempfile::tempdir().unwrap();
    let meta = std::fs::metadata("/proc/self/fd/2").unwrap();
    let state = dir.path().join("state");
    let mut proc = Proc::spawn(
        "grantlined",
        Command::new(bin("grantlined"))
            .args(["dev", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
            .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino())),
    );
    let addr = proc.wait_line("grantlined ready on");
    let broker = Broker { proc, dir: grantline_tests::BrokerDir::Borrowed(state), addr };
    let agent = grantline_tests::Agent::start(&broker, "journaled");
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["x509", "--role", "dev", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));

    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(10);
    let record = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no 'granted' record reached the journal");
        journal.set_read_timeout(Some(left)).unwrap();
        let n = journal.recv(&mut buf).unwrap();
        let fields = journal_fields(&buf[..n]);
        if fields.iter().any(|(k, v)| k == "MESSAGE" && v == "granted") {
            break fields;
        }
    };
    let field = |name: &str| record.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    // Genesis, the dev broker's and the agent's join tokens, the enrollment:
    // the grant is seq 4.
    for (name, want) in
        [("NODE", "journaled"), ("KIND", "x509"), ("ROLE", "dev"), ("SEQ", "4"), ("SYSLOG_IDENTIFIER", "grantlined")]
    {
        assert_eq!(field(name), Some(want), "{name} in {record:?}");
    }
    assert!(field("FINGERPRINT").is_some_and(|f| f.len() == 64), "{record:?}");
}

/// Parses one datagram of the journal's native protocol: `KEY=value` lines,
/// or `KEY`, newline, a little-endian u64 length, the value and a newline.
fn journal_fields(mut b: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let end = b.iter().position(|c| *c == b'\n').expect("a field ends with a newline");
        let line = &b[..end];
        if let Some(eq) = line.iter().position(|c| *c == b'=') {
            out.push((String::from_utf8_lossy(&line[..eq]).into(), String::from_utf8_lossy(&line[eq + 1..]).into()));
            b = &b[end + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let len = usize::try_from(u64::from_le_bytes(b[end + 1..end + 9].try_into().unwrap())).unwrap();
            let value = &b[end + 9..end + 9 + len];
            out.push((key, String::from_utf8_lossy(value).into()));
            b = &b[end + 9 + len + 1..];
        }
    }
    out
}
