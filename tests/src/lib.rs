//! Harness for end-to-end tests: real `grantlined`, `grantline-agent` and
//! `grantline` processes from the release build, on loopback ports of their
//! own, stopped on drop. Readiness is read from the processes' stdout lines,
//! never guessed with sleeps.
#![allow(clippy::unwrap_used)]

pub mod failover;
pub mod fleet;
pub mod in_process;
pub mod load;
pub mod object_stores;
pub mod openbao;
pub mod postgres;
pub mod quic_peer;
pub mod raw;
pub mod spiffe;
pub mod sshd;
pub mod vault_proxy;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use grantline_proto::audit::{Entry, Event};

/// How long a process may take to print a readiness line.
pub const READY: Duration = Duration::from_secs(30);

/// A binary of the release build (or of `GRANTLINE_BIN_DIR`).
/// A free loopback TCP port. The listener is dropped before use; the window
/// in which another process could take it is the usual small one.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("GRANTLINE_BIN_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"), PathBuf::from);
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found; build the binaries first: cargo build --release --bins (or set GRANTLINE_BIN_DIR)",
        path.display()
    );
    path
}

/// A child process whose stdout lines arrive on a channel.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub name: &'static str,
}

impl Proc {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, name }
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        let line = self.wait_for(prefix, |l| l.starts_with(prefix));
        line[prefix.len()..].trim().to_owned()
    }

    /// Waits for a stdout line containing `needle`; returns the line.
    pub fn wait_line_containing(&mut self, needle: &str) -> String {
        self.wait_for(needle, |l| l.contains(needle))
    }

    /// The stdout lines printed during the next `window`: for showing that
    /// something does not happen often.
    pub fn lines_for(&mut self, window: Duration) -> Vec<String> {
        let until = std::time::Instant::now() + window;
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(until.saturating_duration_since(std::time::Instant::now())) {
            lines.push(line);
        }
        lines
    }

    fn wait_for(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + READY;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return line,
                Ok(_) => {}
                Err(e) => {
                    panic!("{} did not print {what:?} ({e:?}); exit status {:?}", self.name, self.child.try_wait())
                }
            }
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// Waits for the process to exit, at most `limit`; None if it did not.
    pub fn wait_at_most(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A dev broker in a temporary state directory.
pub struct Broker {
    pub proc: Proc,
    pub dir: BrokerDir,
    pub addr: String,
}

/// A broker's state directory: its own temporary one, or one it was given.
pub enum BrokerDir {
    Owned(tempfile::TempDir),
    Borrowed(PathBuf),
}

impl BrokerDir {
    pub fn path(&self) -> &Path {
        match self {
            Self::Owned(t) => t.path(),
            Self::Borrowed(p) => p,
        }
    }
}

impl Broker {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A dev broker with extra `grantlined dev` flags.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (proc, addr) = Self::spawn(dir.path(), "127.0.0.1:0", extra);
        Self { proc, dir: BrokerDir::Owned(dir), addr }
    }

    fn spawn(dir: &Path, listen: &str, extra: &[&str]) -> (Proc, String) {
        let mut proc = Proc::spawn(
            "grantlined",
            Command::new(bin("grantlined"))
                .args(["dev", "--state-dir"])
                .arg(dir)
                .args(["--listen", listen])
                .args(extra),
        );
        let addr = proc.wait_line("grantlined ready on");
        (proc, addr)
    }

    /// A broker from a production configuration in a temporary state
    /// directory: `policy` is its policy file, `extra` is appended to its
    /// grantlined.toml (e.g. a `[vault]` section; `{dir}` in it is the state
    /// directory). Unless `extra` has an `[admin]` section, the admin socket
    /// is `admin.sock` in the state directory and metrics use a free port.
    pub fn start_config(policy: &str, extra: &str) -> Self {
        Self::start_config_in(tempfile::tempdir().unwrap(), "grantline.test/broker", policy, extra)
    }

    /// [`Broker::start_config`] in a state directory prepared by the caller
    /// (a fleet broker's, after `grantlined fleet join`), under `origin`.
    pub fn start_config_in(dir: tempfile::TempDir, origin: &str, policy: &str, extra: &str) -> Self {
        let (proc, addr) = Self::spawn_config(dir.path(), origin, policy, extra);
        Self { proc, dir: BrokerDir::Owned(dir), addr }
    }

    /// Starts a configured broker again on its state directory and port
    /// (its grantlined.toml is rewritten with the port it had).
    pub fn restart_config(&mut self) {
        let cfg = self.path("grantlined.toml");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{}\"", self.addr));
        std::fs::write(&cfg, text).unwrap();
        let mut proc = Proc::spawn("grantlined", Command::new(bin("grantlined")).arg("--config").arg(&cfg));
        assert_eq!(proc.wait_line("grantlined ready on"), self.addr);
        self.proc = proc;
    }

    fn spawn_config(dir: &Path, origin: &str, policy: &str, extra: &str) -> (Proc, String) {
        let extra = extra.replace("{dir}", &dir.display().to_string());
        let extra = extra.as_str();
        std::fs::write(dir.join("policy.toml"), policy).unwrap();
        let cfg = dir.join("grantlined.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = \"{d}\"\npolicy = \"{d}/policy.toml\"\norigin = \"{origin}\"\nserver_names = [\"127.0.0.1\"]\n{extra}\n{admin}",
                admin = if extra.contains("[admin]") {
                    String::new()
                } else {
                    format!("[admin]\nsocket = \"{}/admin.sock\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n", dir.display())
                },
                d = dir.display()
            ),
        )
        .unwrap();
        let mut proc = Proc::spawn("grantlined", Command::new(bin("grantlined")).arg("--config").arg(&cfg));
        let addr = proc.wait_line("grantlined ready on");
        (proc, addr)
    }

    /// A dev broker on an existing state directory, owned by the caller.
    pub fn start_in(dir: &Path) -> Self {
        Self::start_in_with(dir, &[])
    }

    /// The same, with extra `grantlined dev` flags.
    pub fn start_in_with(dir: &Path, extra: &[&str]) -> Self {
        let (proc, addr) = Self::spawn(dir, "127.0.0.1:0", extra);
        Self { proc, dir: BrokerDir::Borrowed(dir.to_owned()), addr }
    }

    /// Starts the broker again on the same state directory and port, after it
    /// stopped.
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// Restarts with extra `grantlined dev` flags.
    pub fn restart_with(&mut self, extra: &[&str]) {
        let (proc, addr) = Self::spawn(self.dir.path(), &self.addr, extra);
        assert_eq!(addr, self.addr);
        self.proc = proc;
    }

    /// Kills the broker with SIGKILL and starts it again on the same port.
    pub fn kill9_and_restart(&mut self) {
        self.proc.kill9();
        let (proc, addr) = Self::spawn(self.dir.path(), &self.addr, &[]);
        assert_eq!(addr, self.addr);
        self.proc = proc;
    }

    pub fn path(&self, name: &str) -> PathBuf {
        BrokerSide::path(self, name)
    }

    /// The join token `grantlined dev` wrote.
    pub fn join_token(&self) -> String {
        std::fs::read_to_string(self.path("join-token")).unwrap().trim().to_owned()
    }

    /// The broker's admin socket (dev brokers and `start_config` put it in the state directory).
    pub fn admin_socket(&self) -> PathBuf {
        self.path("admin.sock")
    }

    /// Runs `grantline ARGS --socket <this broker's admin socket>`.
    pub fn admin(&self, args: &[&str]) -> Output {
        Command::new(bin("grantline")).args(args).arg("--socket").arg(self.admin_socket()).output().unwrap()
    }

    /// A fresh token from `grantline token create`.
    pub fn new_token(&self, extra: &[&str]) -> String {
        BrokerSide::new_token(self, extra)
    }

    /// `grantline audit verify --json` on this broker's log.
    pub fn verify(&self) -> (bool, serde_json::Value) {
        BrokerSide::verify(self)
    }

    /// Every event in the audit log, in order.
    pub fn events(&self) -> Vec<Event> {
        BrokerSide::events(self)
    }
}

/// What a test needs of a broker however it runs: a `grantlined` process
/// ([`Broker`]) or the library in this process
/// ([`in_process::InProcessBroker`]).
pub trait BrokerSide {
    /// Where it listens, IP:PORT.
    fn addr(&self) -> &str;
    fn state_dir(&self) -> &Path;

    fn path(&self, name: &str) -> PathBuf {
        self.state_dir().join(name)
    }

    /// A fresh token from `grantline token create`.
    fn new_token(&self, extra: &[&str]) -> String {
        let out = grantline(&["token", "create", "--state-dir", self.state_dir().to_str().unwrap()], extra);
        assert!(out.status.success(), "token create failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// `grantline audit verify --json` on its log.
    fn verify(&self) -> (bool, serde_json::Value) {
        verify_db(&self.path("audit.db"), &self.path("audit.vkey"))
    }

    /// Every event in its audit log, in order.
    fn events(&self) -> Vec<Event> {
        events(&self.path("audit.db"))
    }
}

impl BrokerSide for Broker {
    fn addr(&self) -> &str {
        &self.addr
    }

    fn state_dir(&self) -> &Path {
        self.dir.path()
    }
}

pub fn grantline(args: &[&str], extra: &[&str]) -> Output {
    Command::new(bin("grantline")).args(args).args(extra).output().unwrap()
}

pub fn verify_db(db: &Path, key: &Path) -> (bool, serde_json::Value) {
    let out = Command::new(bin("grantline"))
        .args(["audit", "verify", "--json", "--db"])
        .arg(db)
        .arg("--key-file")
        .arg(key)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(out.status.success(), json["ok"] == true, "exit status and verdict disagree: {json}");
    (out.status.success(), json)
}

pub fn events(db: &Path) -> Vec<Event> {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut stmt = conn.prepare("SELECT entry FROM entries ORDER BY seq").unwrap();
    let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap();
    rows.map(|r| Entry::decode(&r.unwrap()).unwrap().event().unwrap()).collect()
}

/// An agent with its own state directory and socket.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub proc: Option<Proc>,
}

impl Agent {
    /// Enrolls with `token` (exit status and output returned for checks).
    pub fn enroll_with(broker: &impl BrokerSide, token: &str, name: &str) -> (Self, Output) {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(bin("grantline-agent"))
            .args(["enroll", "--broker", broker.addr(), "--token", token, "--ca-file"])
            .arg(broker.path("ca.pem"))
            .arg("--state-dir")
            .arg(dir.path())
            .args(["--name", name])
            .output()
            .unwrap();
        (Self { dir, proc: None }, out)
    }

    /// Enrolls with a fresh token and starts `run`, waiting until connected.
    pub fn start(broker: &impl BrokerSide, name: &str) -> Self {
        let token = broker.new_token(&[]);
        let (mut agent, out) = Self::enroll_with(broker, &token, name);
        assert!(out.status.success(), "enroll failed: {}", String::from_utf8_lossy(&out.stderr));
        agent.run();
        agent
    }

    pub fn run(&mut self) {
        self.run_args(&[]);
    }

    /// Restarts `agent` with extra `run` flags, waiting until connected.
    pub fn run_with(mut agent: Self, extra: &[&str]) -> Self {
        agent.proc = None;
        agent.run_args(extra);
        agent
    }

    /// Starts `run` and waits only until it serves its socket (for an
    /// agent its broker is expected to refuse).
    pub fn run_unconnected(mut agent: Self) -> Self {
        agent.proc = None;
        let mut proc = Proc::spawn("grantline-agent", &mut agent.run_command(&[]));
        proc.wait_line("grantline-agent ready on");
        agent.proc = Some(proc);
        agent
    }

    /// `grantline-agent run` on this agent's state, socket and config.
    fn run_command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(bin("grantline-agent"));
        cmd.args(["run", "--state-dir"])
            .arg(self.dir.path())
            .arg("--socket")
            .arg(self.socket())
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .args(extra);
        cmd
    }

    fn run_args(&mut self, extra: &[&str]) {
        let mut proc = Proc::spawn("grantline-agent", &mut self.run_command(extra));
        proc.wait_line("grantline-agent ready on");
        proc.wait_line("grantline-agent connected to");
        self.proc = Some(proc);
    }

    /// Waits until the agent reports a (re)connection.
    pub fn wait_connected(&mut self) {
        self.wait_line("grantline-agent connected to");
    }

    pub fn wait_line(&mut self, prefix: &str) -> String {
        self.proc.as_mut().unwrap().wait_line(prefix)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// Runs `grantline-agent get KIND ... --socket ours`.
    pub fn get(&self, args: &[&str]) -> Output {
        Command::new(bin("grantline-agent")).arg("get").args(args).arg("--socket").arg(self.socket()).output().unwrap()
    }
}

/// SHA-256 of the first certificate in a PEM file, hex: the fingerprint the
/// broker records for an X.509 grant.
pub fn pem_fingerprint(path: &Path) -> String {
    use sha2::Digest;
    let pem = std::fs::read(path).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice()).next().unwrap().unwrap();
    hex::encode(sha2::Sha256::digest(&der))
}

pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `GET /metrics` over a plain TCP connection; the body after a 200.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let hostport = addr.trim_start_matches("http://").trim_end_matches("/metrics");
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// The value of one sample (`name{labels}` exactly as rendered) in a
/// Prometheus text exposition; 0 when absent.
pub fn metric(body: &str, sample: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}
