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

/// Review defect 6: a process connected, then ran an allowed executable (or
/// handed the socket to a child that did) before its request was read, and
/// was recorded as that executable. The agent now refuses a request whose
/// sender no longer runs what it ran when it connected.
#[test]
fn a_caller_that_execs_between_connecting_and_asking_is_refused() {
    let broker = Broker::start();
    let agent = Agent::start(&broker, "exec");
    let dir = tempfile::tempdir().unwrap();
    let request = dir.path().join("request");
    let grant = grantline_proto::wire::LocalRequest {
        body: Some(grantline_proto::wire::local_request::Body::Grant(grantline_proto::wire::GrantRequest {
            kind: grantline_proto::wire::CredentialKind::SshUser as i32,
            role: "dev".into(),
            ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb2X0Yb+6Qf9V3Q2Hn0Bq7Z8yq6zG0cV7tJ0mYbPzqS".into(),
            principals: vec!["p".into()],
            ..Default::default()
        })),
    };
    std::fs::write(&request, grantline_proto::frame::encode(&grant)).unwrap();
    // The attacker's process (python) connects and takes its time, as the
    // review's attacker did, then execs perl (same pid, another executable),
    // which sends the request on the inherited socket and prints the answer.
    // (An exec before the agent looked at the connection cannot be told from
    // a perl caller: see RFD 0009, what an exe rule promises.)
    let perl = format!(
        "open(my $s, '+<&=', 3) or die; binmode $s; open(my $r, '<', '{req}') or die; binmode $r; \
         local $/; my $q = <$r>; syswrite($s, $q); shutdown($s, 1); \
         my $a = ''; while (sysread($s, my $b, 4096)) {{ $a .= $b }} print $a;",
        req = request.display()
    );
    let script = format!(
        "import os, socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({sock:?})\nimport time\ntime.sleep(0.3)\nos.dup2(s.fileno(), 3)\nos.set_inheritable(3, True)\nos.execv('/usr/bin/perl', ['perl', '-e', {perl:?}])\n",
        sock = agent.socket().display().to_string(),
    );
    let out = Command::new("/usr/bin/python3").args(["-c", &script]).output().unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains("ran another executable"), "{answer:?} {}", stderr(&out));
    // The same request from one process is served.
    let ok = agent.get(&["ssh", "--role", "dev", "--principal", "p", "--out", dir.path().join("ok").to_str().unwrap()]);
    assert!(ok.status.success(), "{}", stderr(&ok));
}

/// Second SPIFFE review: the local socket sent SVID requests straight to the
/// broker, past the SPIFFE socket's per-principal budget and cache, so a
/// caller could have the broker sign and audit tokens without bound. SVIDs
/// are the SPIFFE socket's alone.
#[test]
fn svids_are_not_served_on_the_local_socket() {
    let broker = Broker::start();
    let agent = Agent::start(&broker, "svid-local");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for kind in [grantline_proto::wire::CredentialKind::JwtSvid, grantline_proto::wire::CredentialKind::X509Svid] {
        let ask = grantline_proto::wire::LocalRequest {
            body: Some(grantline_proto::wire::local_request::Body::Grant(grantline_proto::wire::GrantRequest {
                kind: kind as i32,
                role: "dev".into(),
                audience: vec!["https://a.example".into()],
                ..Default::default()
            })),
        };
        let answer = rt.block_on(grantline_agent::local::request(&agent.socket(), &ask)).unwrap();
        match answer.body {
            Some(grantline_proto::wire::local_response::Body::Error(e)) => {
                assert_eq!(e.code, grantline_proto::wire::ErrorCode::BadRequest as i32, "{e:?}");
                assert!(e.message.contains("SPIFFE socket"), "{e:?}");
            }
            other => panic!("{kind:?} was served on the local socket: {other:?}"),
        }
    }
    assert!(
        !broker
            .events()
            .iter()
            .any(|e| matches!(e, grantline_proto::audit::Event::Grant { kind, .. } if kind.contains("svid"))),
        "no SVID reached the broker"
    );
}
