//! The attacker is a local user on a node: any uid but root, with the
//! agent's 0666 socket. RFD 0009 lists what they cannot do.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use grantline_tests::{bin, stderr, Agent, Broker, Proc};

/// Review defect 7: a few hundred idle connections made `accept` fail with
/// EMFILE, the serve loop returned the error and the agent exited. Now a uid
/// holds at most 64 connections, idle ones time out, and a failing accept
/// is waited out: root is served throughout and the agent keeps running.
#[test]
fn idle_connections_from_a_local_user_cannot_stop_the_agent() {
    let broker = Broker::start();
    let mut agent = Agent::start(&broker, "crowded");
    // The agent again, with few file descriptors, so the flood reaches its limit.
    agent.proc = None;
    let mut proc = Proc::spawn(
        "grantline-agent",
        Command::new("prlimit")
            .arg("--nofile=160:160")
            .arg("--")
            .arg(bin("grantline-agent"))
            .args(["run", "--state-dir"])
            .arg(agent.dir.path())
            .arg("--socket")
            .arg(agent.socket()),
    );
    proc.wait_line("grantline-agent ready on");
    proc.wait_line("grantline-agent connected to");
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();

    // nobody opens 400 connections and holds them without a word.
    let script = format!(
        "import socket, sys\nheld = []\nfor _ in range(400):\n    s = socket.socket(socket.AF_UNIX)\n    try:\n        s.connect({:?})\n        held.append(s)\n    except OSError:\n        pass\nprint('held', len(held), flush=True)\nsys.stdin.read()\n",
        agent.socket().display().to_string()
    );
    let mut flood = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "/usr/bin/python3", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(flood.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("held"), "{line}");

    // Root is served while the flood holds its connections.
    let out = tempfile::tempdir().unwrap();
    let got = agent.get(&["ssh", "--role", "dev", "--principal", "p", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
    // nobody itself is told why it is refused (a client may retry: the agent
    // answers a bounded number of refused connections at a time).
    let told = (0..20).any(|_| {
        let busy = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin("grantline-agent"))
            .args(["status", "--socket"])
            .arg(agent.socket())
            .output()
            .unwrap();
        assert!(!busy.status.success(), "nobody was served past its limit");
        eprintln!("nobody: {}", stderr(&busy).trim());
        stderr(&busy).contains("connections open")
    });
    assert!(told, "nobody was never told why it was refused");

    flood.stdin.take().unwrap().write_all(b"done").unwrap();
    let _ = flood.wait();
    assert!(proc.wait_at_most(std::time::Duration::from_millis(1)).is_none(), "the agent exited under the flood");
    let got = agent.get(&["ssh", "--role", "dev", "--principal", "p", "--out", out.path().to_str().unwrap()]);
    assert!(got.status.success(), "{}", stderr(&got));
}
