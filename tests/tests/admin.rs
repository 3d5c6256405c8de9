//! The admin control plane: gRPC on a Unix socket, the `grantline` CLI over
//! it, policy reload, Prometheus metrics, and a client generated from the
//! `.proto` by another toolchain (Python grpcio-tools).

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use grantline_proto::audit::Event;
use grantline_tests::{bin, scrape, stderr, Agent, Broker, Proc};

const POLICY: &str = r#"
[[rule]]
name = "dev"
[[rule.allow]]
kinds = ["x509"]
roles = ["dev"]
max_ttl = "1h"
sans = ["*"]
"#;

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn the_admin_socket_refuses_callers_outside_root_and_the_admin_group() {
    // A socket anyone may connect to, so the broker's own check is what refuses.
    let broker = Broker::start_config(
        POLICY,
        "[admin]\nsocket = \"{dir}/admin.sock\"\nsocket_mode = \"0666\"\ngroup = \"grantline-test-no-such-group\"\n[metrics]\nenabled = false\n",
    );
    std::fs::set_permissions(broker.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let as_nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin("grantline"))
        .args(["nodes", "list", "--socket"])
        .arg(broker.admin_socket())
        .output()
        .unwrap();
    assert_eq!(as_nobody.status.code(), Some(77), "{}", stderr(&as_nobody));
    assert!(stderr(&as_nobody).contains("uid 65534 may not use the admin API"), "{}", stderr(&as_nobody));
    let token = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin("grantline"))
        .args(["token", "create", "--socket"])
        .arg(broker.admin_socket())
        .output()
        .unwrap();
    assert_eq!(token.status.code(), Some(77), "{}", stderr(&token));
    assert!(token.stdout.is_empty(), "a token was printed to a refused caller");

    let as_root = broker.admin(&["nodes", "list"]);
    assert!(as_root.status.success(), "{}", stderr(&as_root));
    assert!(!broker.events().iter().any(|e| matches!(e, Event::TokenCreation { .. })), "a refused call was acted on");
}

#[test]
fn the_cli_lists_nodes_and_grants_tails_the_audit_log_and_reloads_policy() {
    let mut broker = Broker::start_with(&["--metrics", "127.0.0.1:0"]);
    let metrics = broker.proc.wait_line("grantlined metrics on");
    let agent = Agent::start(&broker, "web-1");
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let got = agent.get(&["x509", "--role", "dev", "--san", "web-1.example.com", "--out", dir]);
    assert!(got.status.success(), "{}", stderr(&got));

    // Nodes: a table for people, JSON for scripts.
    let table = broker.admin(&["nodes", "list"]);
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(text.starts_with("NODE"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("web-1") && l.contains("connected")), "{text}");
    let nodes = json_of(&broker.admin(&["nodes", "list", "--json"]));
    assert_eq!(nodes[0]["name"], "web-1");
    assert_eq!(nodes[0]["connected"], true);
    assert!(nodes[0]["identity_not_after"].is_string());

    // The inventory holds the grant, with the local caller.
    let grants = json_of(&broker.admin(&["grants", "list", "--json"]));
    assert_eq!(grants.as_array().unwrap().len(), 1, "{grants}");
    assert_eq!(grants[0]["kind"], "x509");
    assert_eq!(grants[0]["names"][0], "web-1.example.com");
    assert_eq!(grants[0]["caller"]["uid"], 0);
    let fp = grantline_tests::pem_fingerprint(&out.path().join("cert.pem"));
    assert_eq!(grants[0]["fingerprint"], fp.as_str());
    assert!(json_of(&broker.admin(&["grants", "list", "--kind", "ssh-user", "--json"])).as_array().unwrap().is_empty());

    // Tail: the last entries, then new ones as they come; each read is audited.
    let tail = broker.admin(&["audit", "tail", "--last", "3", "--json"]);
    let lines: Vec<serde_json::Value> =
        String::from_utf8(tail.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines.iter().any(|l| l["event"]["type"] == "grant"), "{lines:?}");
    let mut follow = Proc::spawn(
        "grantline audit tail",
        Command::new(bin("grantline")).args(["audit", "tail", "--follow", "--socket"]).arg(broker.admin_socket()),
    );
    let got = agent.get(&["x509", "--role", "dev", "--san", "web-2.example.com", "--out", dir]);
    assert!(got.status.success(), "{}", stderr(&got));
    let line = follow.wait_line_containing("web-2.example.com");
    assert!(line.contains("grant"), "{line}");
    drop(follow);
    let reads = broker.events().into_iter().filter(|e| matches!(e, Event::AuditRead { .. })).count();
    assert!(reads >= 3, "inventory, tail and follow reads are audited: {reads}");

    // An invalid policy is refused with its line; the old one stays in force.
    let policy = broker.path("policy.toml");
    let good = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(&policy, "[[rule]]\nname = \"broken\"\n[[rule.allow]]\nkinds = [\"x509\"]\nroles = [\"dev\"]\nmax_ttl = \"forever\"\nsans = [\"*\"]\n").unwrap();
    let refused = broker.admin(&["policy", "reload"]);
    assert_eq!(refused.status.code(), Some(65), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("line 2") && stderr(&refused).contains("max_ttl"), "{}", stderr(&refused));
    let got = agent.get(&["x509", "--role", "dev", "--out", dir]);
    assert!(got.status.success(), "the old policy should still be in force: {}", stderr(&got));

    // A valid one takes over: role dev is gone, role web allowed.
    std::fs::write(&policy, good.replace("roles = [\"dev\"]", "roles = [\"web\"]")).unwrap();
    let reloaded = json_of(&broker.admin(&["policy", "reload", "--json"]));
    assert_eq!(reloaded["changed"], true, "{reloaded}");
    let denied = agent.get(&["x509", "--role", "dev", "--out", dir]);
    assert_eq!(denied.status.code(), Some(77), "{}", stderr(&denied));
    let got = agent.get(&["x509", "--role", "web", "--out", dir]);
    assert!(got.status.success(), "{}", stderr(&got));

    // SIGHUP reloads too; a broken file is refused and audited.
    std::fs::write(&policy, "not toml [").unwrap();
    broker.proc.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let reloads = loop {
        let reloads: Vec<Event> =
            broker.events().into_iter().filter(|e| matches!(e, Event::PolicyReload { .. })).collect();
        if reloads.len() == 3 || std::time::Instant::now() > deadline {
            break reloads;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        matches!(&reloads[..], [
            Event::PolicyReload { ok: false, admin: Some(_), .. },
            Event::PolicyReload { ok: true, admin: Some(_), .. },
            Event::PolicyReload { ok: false, admin: None, error, .. },
        ] if error.contains("TOML")),
        "{reloads:?}"
    );
    let got = agent.get(&["x509", "--role", "web", "--out", dir]);
    assert!(got.status.success(), "{}", stderr(&got));

    // Metrics count what happened.
    let body = scrape(&metrics);
    for want in [
        "grantline_grants_total{kind=\"x509\",outcome=\"granted\"} 5",
        "grantline_grants_total{kind=\"x509\",outcome=\"denied\"} 1",
        "grantline_connections 1",
        "grantline_audit_append_seconds_bucket",
        "grantline_checkpoint_age_seconds",
        "grantline_policy_reloads_total{outcome=\"refused\"} 2",
    ] {
        assert!(body.contains(want), "{want} missing from:\n{body}");
    }
    let (ok, v) = broker.verify();
    assert!(ok, "{v}");
}

#[test]
fn a_python_grpc_client_generated_from_the_proto_drives_the_admin_api() {
    let broker = Broker::start();
    let gen = tempfile::tempdir().unwrap();
    let proto_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/proto");
    let protoc = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto_root)
        .arg(format!("--python_out={}", gen.path().display()))
        .arg(format!("--grpc_python_out={}", gen.path().display()))
        .arg("grantline/admin/v1/admin.proto")
        .output()
        .unwrap();
    assert!(
        protoc.status.success(),
        "grpc_tools.protoc (scripts/install-test-deps.sh installs it): {}",
        stderr(&protoc)
    );
    let script = r#"
import json, sys
import grpc
from grantline.admin.v1 import admin_pb2, admin_pb2_grpc

# The HTTP/2 server (hyper's h2) refuses the percent-encoded socket path
# that grpc-core >= 1.57 sends as :authority over a Unix socket; "localhost"
# is the convention (RFD 0006).
channel = grpc.insecure_channel("unix:" + sys.argv[1], options=[("grpc.default_authority", "localhost")])
stub = admin_pb2_grpc.AdminStub(channel)
token = stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(node_name="py-node", labels={"team": "py"}, ttl_seconds=600))
checkpoint = stub.GetCheckpoint(admin_pb2.GetCheckpointRequest())
try:
    stub.RevokeNode(admin_pb2.RevokeNodeRequest(node_name="nobody-here"))
    missing = "no error"
except grpc.RpcError as e:
    missing = e.code().name
print(json.dumps({"token": token.token, "expires": token.expires_at_unix,
                  "vkey": checkpoint.verifier_key, "missing": missing}))
"#;
    let run = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(broker.admin_socket())
        .env("PYTHONPATH", gen.path())
        .output()
        .unwrap();
    let v = json_of(&run);
    assert_eq!(v["missing"], "NOT_FOUND", "{v}");
    assert_eq!(v["vkey"], std::fs::read_to_string(broker.path("audit.vkey")).unwrap().trim());

    // The token works, and pins the name and labels.
    let (_agent, out) = Agent::enroll_with(&broker, v["token"].as_str().unwrap(), "something-else");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("node py-node"));
    let nodes = json_of(&broker.admin(&["nodes", "list", "--json"]));
    assert_eq!(nodes[0]["labels"]["team"], "py", "{nodes}");
}

/// Connects to `admin_socket` as uid/gid 65534 with `groups` (setpriv's
/// form: `--groups=4` or `--clear-groups`), then hands the connection to a
/// child and exits: the child relays it to a new socket, returned, which
/// anyone may use. The broker sees the credentials of the process that
/// connected, which no longer exists.
fn relay_connection_of_a_gone_process(admin_socket: &std::path::Path, groups: &str) -> tempfile::TempDir {
    const RELAY: &str = r#"
import os, select, socket, sys
up = socket.socket(socket.AF_UNIX)
up.connect(sys.argv[1])
srv = socket.socket(socket.AF_UNIX)
srv.bind(sys.argv[2])
os.chmod(sys.argv[2], 0o777)
srv.listen(1)
if os.fork():
    os._exit(0)  # the process that connected is gone
srv.settimeout(60)
conn, _ = srv.accept()
while True:
    ready, _, _ = select.select([up, conn], [], [], 60)
    if not ready:
        break
    for s in ready:
        data = s.recv(65536)
        if not data:
            sys.exit(0)
        (conn if s is up else up).sendall(data)
"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let connected = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", groups, "--", "/usr/bin/python3", "-c", RELAY])
        .arg(admin_socket)
        .arg(dir.path().join("relay.sock"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(connected.success(), "the relay did not start");
    dir
}

/// The admin API once read a caller's supplementary groups from
/// /proc/PID/status when a request came in, so it judged whatever process
/// held the pid by then: a process gone since (its pid free for reuse by a
/// member of the admin group) had no groups at all. It now judges the
/// groups the kernel recorded at connect() (SO_PEERGROUPS).
#[test]
fn admin_callers_are_judged_by_the_groups_they_connected_with_not_by_their_pid_later() {
    let broker = Broker::start_config(
        POLICY,
        "[admin]\nsocket = \"{dir}/admin.sock\"\nsocket_mode = \"0666\"\ngroup = \"adm\"\n[metrics]\nenabled = false\n",
    );
    std::fs::set_permissions(broker.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let list_through = |relay: &tempfile::TempDir| {
        Command::new(bin("grantline"))
            .args(["nodes", "list", "--socket"])
            .arg(relay.path().join("relay.sock"))
            .output()
            .unwrap()
    };
    // A member of `adm` (gid 4 on Debian) connected; it is gone, its
    // connection is used by another process.
    let member = relay_connection_of_a_gone_process(&broker.admin_socket(), "--groups=4");
    let got = list_through(&member);
    assert!(got.status.success(), "a member of the admin group was refused: {}", stderr(&got));
    // Someone outside the group connected: refused, whoever holds its pid.
    let outsider = relay_connection_of_a_gone_process(&broker.admin_socket(), "--clear-groups");
    let got = list_through(&outsider);
    assert_eq!(got.status.code(), Some(77), "{}", stderr(&got));
    assert!(stderr(&got).contains("uid 65534 may not use the admin API"), "{}", stderr(&got));
}
