//! A broker with a SPIFFE trust domain and an agent serving its SPIFFE
//! socket (RFD 0011), and the independent clients of `tests/spiffe/clients.py`
//! run as workloads told apart by their executables (each its own copy of
//! the Python interpreter). Shared by `tests/tests/spiffe.rs` and
//! `grantline-spiffe-bench`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{free_port, Agent, Broker};

/// The trust domain of these tests.
pub const TD: &str = "grantline.test";

pub struct Node {
    pub broker: Broker,
    pub agent: Agent,
    pub issuer: String,
    /// Where the interpreter copies live.
    pub bin: tempfile::TempDir,
}

impl Node {
    /// A broker with `policy` (SVIDs of trust domain [`TD`], OIDC on a port
    /// of its own) and an enrolled agent serving its SPIFFE socket.
    pub fn start(policy: &str) -> Self {
        Self::start_with(policy, "")
    }

    /// [`Node::start`] with `agent_toml` as the agent's agent.toml (`{dir}`
    /// in it is the agent's state directory).
    pub fn start_with(policy: &str, agent_toml: &str) -> Self {
        let port = free_port();
        let extra = format!(
            "[spiffe]\ntrust_domain = \"{TD}\"\n[spiffe.oidc]\nlisten = \"127.0.0.1:{port}\"\nissuer = \"https://127.0.0.1:{port}\"\n"
        );
        let broker = Broker::start_config(policy, &extra);
        let token = broker.new_token(&[]);
        let (agent, out) = Agent::enroll_with(&broker, &token, "node-1");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let config = agent_toml.replace("{dir}", &agent.dir.path().display().to_string());
        std::fs::write(agent.dir.path().join("agent.toml"), config).unwrap();
        let socket = agent.dir.path().join("spiffe.sock");
        let agent = Agent::run_with(agent, &["--spiffe-socket", socket.to_str().unwrap()]);
        Self { broker, agent, issuer: format!("https://127.0.0.1:{port}"), bin: tempfile::tempdir().unwrap() }
    }

    pub fn socket(&self) -> PathBuf {
        self.agent.dir.path().join("spiffe.sock")
    }

    /// Runs tests/spiffe/clients.py as the workload `exe`; its JSON answer.
    pub fn client(&self, exe: &str, args: &[&str]) -> serde_json::Value {
        let out = self.client_command(exe, args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{exe} {args:?}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
    }

    pub fn client_command(&self, exe: &str, args: &[&str]) -> Command {
        let path = self.bin.path().join(exe);
        if !path.exists() {
            std::fs::copy(python(), &path).unwrap();
            executable_once_released(&path);
        }
        let mut cmd = Command::new(path);
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("spiffe/clients.py"))
            .args(args)
            .env("SPIFFE_ENDPOINT_SOCKET", format!("unix://{}", self.socket().display()));
        cmd
    }

    pub fn id(name: &str) -> String {
        format!("spiffe://{TD}/{name}")
    }
}

/// The interpreter itself (not a shim or symlink), to copy.
/// Waits until the copy at `path` can be executed. A process that another
/// test forked while the copy was open for writing holds it open until that
/// process execs, and executing the copy meanwhile fails with ETXTBSY (seen:
/// "Text file busy" from the SDS test). Once one exec succeeds nobody holds
/// it any more.
fn executable_once_released(path: &Path) {
    for _ in 0..500 {
        match Command::new(path).args(["-c", ""]).status() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Ok(status) => return assert!(status.success(), "{} -c '' failed: {status}", path.display()),
            Err(e) => panic!("cannot run {}: {e}", path.display()),
        }
    }
    panic!("{} stayed busy for 5 s", path.display());
}

fn python() -> PathBuf {
    let out = Command::new("python3").args(["-c", "import os,sys; print(os.path.realpath(sys.executable))"]).output();
    PathBuf::from(String::from_utf8(out.unwrap().stdout).unwrap().trim())
}
