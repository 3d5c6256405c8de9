//! SPIFFE on the node (RFD 0011), through independent clients only: py-spiffe,
//! spiffe-tls, an Envoy SDS client generated from Envoy's protos, PyJWT, the
//! Rust `spiffe` crate, and `openssl`. Workloads are told apart by their
//! executables: each runs its own copy of the Python interpreter.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use grantline_proto::audit::Event;
use grantline_tests::free_port;
use grantline_tests::spiffe::{Node, TD};

const AUDIENCE: &str = "https://api.example.org";

/// SVIDs live 20 s, so the agent renews them within 10 s. The workloads
/// run as this test's uid; their executables tell them apart within it.
fn policy() -> String {
    let uid = nix::unistd::getuid().as_raw();
    let mut p = String::from("[[rule]]\nname = \"workloads\"\n");
    for (exe, id) in [
        ("*/frontend", "frontend"),
        ("*/backend", "backend"),
        ("*/intruder", "intruder"),
        ("*/deps/spiffe-*", "rust"),
        ("*/grantline-agent", "node/{node}"),
    ] {
        p.push_str(&format!(
            "[[rule.allow]]\nkinds = [\"x509-svid\", \"jwt-svid\"]\nroles = [\"spiffe\"]\nmax_ttl = \"20s\"\n\
             default_ttl = \"20s\"\nuids = [{uid}]\nexe = [\"{exe}\"]\nspiffe_ids = [\"spiffe://{{trust_domain}}/{id}\"]\n\
             audiences = [\"https://*.example.org\"]\n"
        ));
    }
    p
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn py_spiffe_sources_get_audited_svids_rotated_before_half_life() {
    let node = Node::start(&policy());
    let files = tempfile::tempdir().unwrap();
    let x = node.client("frontend", &["x509", files.path().to_str().unwrap(), "25"]);
    assert_eq!(x["spiffe_id"], Node::id("frontend"), "{x}");
    assert_eq!(x["chain"], 2, "leaf first, then the SVID CA: {x}");
    let serials = x["serials"].as_array().unwrap();
    assert_eq!(serials.len(), 2, "the stream pushed a renewed SVID: {x}");

    // openssl, on what py-spiffe received: it chains to the bundle, and is
    // an X509-SVID leaf (one URI SAN, critical digitalSignature, CA:FALSE).
    let p = |n: &str| files.path().join(n).display().to_string();
    let (ok, text) =
        openssl(&["verify", "-CAfile", &p("bundle.pem"), "-untrusted", &p("intermediates.pem"), &p("svid.pem")]);
    assert!(ok && text.contains(": OK"), "{text}");
    let (ok, text) = openssl(&["x509", "-in", &p("svid.pem"), "-noout", "-text"]);
    assert!(ok, "{text}");
    assert_eq!(text.matches("URI:").count(), 1, "{text}");
    assert!(text.contains(&format!("URI:{}", Node::id("frontend"))), "{text}");
    assert!(text.contains("X509v3 Key Usage: critical") && text.contains("Digital Signature"), "{text}");
    assert!(!text.contains("Certificate Sign") && !text.contains("CRL Sign"), "{text}");
    assert!(text.contains("CA:FALSE") && text.contains("TLS Web Client Authentication"), "{text}");

    let j = node.client("frontend", &["jwt", AUDIENCE]);
    assert_eq!(j["spiffe_id"], Node::id("frontend"), "{j}");
    let token = j["token"].as_str().unwrap();
    let v = node.client("backend", &["validate", token, AUDIENCE]);
    assert_eq!(v["valid"], true, "the agent's ValidateJWTSVID takes it: {v}");
    let v = node.client("backend", &["validate", token, "https://other.example.org"]);
    assert_eq!(v["valid"], false, "{v}");

    // Every SVID is in the log, with its ID and caller, before it was handed
    // out; the token itself is not, and the log verifies.
    let events = node.broker.events();
    let svids: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Grant { kind, spiffe_id, caller: Some(c), serial, audience, .. }
                if spiffe_id == &Node::id("frontend") =>
            {
                Some((kind.as_str(), c.exe.clone(), serial.clone(), audience.clone()))
            }
            _ => None,
        })
        .collect();
    for s in serials {
        let serial = s.as_str().unwrap().trim_start_matches('0');
        assert!(
            svids.iter().any(|(k, exe, sn, _)| *k == "x509-svid"
                && exe.ends_with("/frontend")
                && sn.trim_start_matches('0') == serial),
            "X509-SVID {serial} is not audited: {svids:?}"
        );
    }
    assert!(svids.iter().any(|(k, _, _, aud)| *k == "jwt-svid" && aud == &vec![AUDIENCE.to_owned()]), "{svids:?}");
    let db = std::fs::read(node.broker.path("audit.db")).unwrap();
    let needle = token.split('.').nth(2).unwrap().as_bytes();
    assert!(!db.windows(needle.len()).any(|w| w == needle), "the JWT-SVID's signature is in the audit log");
    let (ok, report) = node.broker.verify();
    assert!(ok, "{report}");
}

#[test]
fn spiffe_tls_connects_two_workloads_and_the_authorizer_refuses_a_third() {
    let node = Node::start(&policy());
    let port = free_port().to_string();
    let mut server = node.client_command("backend", &["mtls-server", &port, &Node::id("frontend")]);
    let mut server = server.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(server.stdout.take().unwrap()));
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["spiffe_id"], Node::id("backend"), "{first}");
    let good = node.client("frontend", &["mtls-client", &port]);
    let bad = node.client("intruder", &["mtls-client", &port]);
    let served: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert!(server.wait().unwrap().success());
    assert_eq!(good["ok"], true, "{good} {served}");
    assert_eq!(good["reply"], format!("hello from {}", Node::id("frontend")), "{good}");
    assert_eq!(bad["spiffe_id"], Node::id("intruder"), "{bad}");
    let served = served["served"].as_array().unwrap();
    assert_eq!(served[0], "accepted", "{served:?}");
    assert!(served[1].as_str().unwrap().starts_with("refused"), "the authorizer refused the intruder: {served:?}");
    assert!(bad["ok"] == false || bad["reply"] == "", "{bad}");
}

#[test]
fn envoy_sds_streams_the_certificate_and_bundle_and_their_rotation() {
    let node = Node::start(&policy());
    let s = node.client("frontend", &["sds", "25"]);
    let versions = s["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "a second response after the rotation: {s}");
    assert_ne!(versions[0], versions[1], "{s}");
    assert_eq!(s["kinds"]["default"], "tls_certificate", "{s}");
    assert_eq!(s["kinds"]["ROOTCA"], "validation_context", "{s}");
    assert_eq!(s["chain_has_key"], true, "{s}");
    assert_eq!(s["chain_pems"], 2, "{s}");
    assert_eq!(s["bundle_pems"], 1, "{s}");
    assert_eq!(s["fetched"], 1, "{s}");
}

/// Opens `n` TCP connections to `to` from the local address `from`, and
/// sends nothing on them.
fn idle_connections(from: &str, to: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..n {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(format!("{from}:0").parse().unwrap()).unwrap();
            conns.push(s.connect(to).await.unwrap().into_std().unwrap());
        }
        conns
    })
}

/// How many of `conns` the peer has closed (the rest it still holds open).
fn closed_by_peer(conns: &[std::net::TcpStream]) -> usize {
    conns
        .iter()
        .filter(|c| match std::io::Read::read(&mut &**c, &mut [0u8; 1]) {
            Ok(0) => true,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            Ok(_) => false,
        })
        .count()
}

#[test]
fn jwt_svids_verify_through_oidc_discovery_and_forgeries_do_not() {
    let node = Node::start(&policy());
    // Review finding: 256 idle connections from one host filled the
    // endpoint, and relying parties waited behind them. Past 8 from one
    // source the endpoint closes a connection at once; others are served.
    let oidc_addr: std::net::SocketAddr = node.issuer.trim_start_matches("https://").parse().unwrap();
    let idle = idle_connections("127.0.0.2", oidc_addr, 64);
    let j = node.client("frontend", &["jwt", AUDIENCE]);
    let token = j["token"].as_str().unwrap();
    // The endpoint's own single-use CA, not the broker's root (which also
    // signs workload leaves that could pose as the endpoint).
    let ca = node.broker.path("oidc-ca.pem");
    let mut cmd = node.client_command("frontend", &["oidc", &node.issuer, ca.to_str().unwrap(), token, AUDIENCE]);
    let out = cmd.env("JWT_KEY_FILE", node.broker.path("jwt-svid.key")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let o: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(o["issuer"], node.issuer, "{o}");
    // Accepted in order, so all 64 were judged before the client was served:
    // at most 8 held from 127.0.0.2 (those too once the 3 s handshake
    // deadline passes), the rest closed at once.
    let closed = closed_by_peer(&idle);
    assert!(closed >= 56, "only {closed} of 64 idle connections from one host were closed");
    assert_eq!(o["token"], format!("valid:{}", Node::id("frontend")), "{o}");
    assert_eq!(o["other_audience"], "InvalidAudienceError", "{o}");
    assert_eq!(o["expired"], "ExpiredSignatureError", "{o}");
    assert_eq!(o["other_key"], "InvalidSignatureError", "{o}");
    let v = node.client("backend", &["validate", o["forged"].as_str().unwrap(), AUDIENCE]);
    assert_eq!(v["valid"], false, "the agent refuses the forgery too: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_codes_and_the_rust_spiffe_client() {
    let node = tokio::task::spawn_blocking(|| Node::start(&policy())).await.unwrap();
    // Without the security header: InvalidArgument; a caller the policy
    // maps to no ID: PermissionDenied (SPIFFE Workload Endpoint §§4, 6).
    let codes = {
        let node = &node;
        tokio::task::block_in_place(|| node.client("nobody", &["codes"]))
    };
    assert_eq!(codes["no_header"], "INVALID_ARGUMENT", "{codes}");
    assert_eq!(codes["with_header"], "PERMISSION_DENIED", "{codes}");
    assert!(codes["with_header_message"].as_str().unwrap().contains("no policy rule"), "{codes}");
    // The Rust spiffe crate, from this test process (its own rule).
    let endpoint = format!("unix:{}", node.socket().display());
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint).await.unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), Node::id("rust"));
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&spiffe::TrustDomain::new(TD).unwrap()).is_some());
    let token = client.fetch_jwt_token(&[AUDIENCE], None).await.unwrap();
    let checked = client.validate_jwt_token(AUDIENCE, &token).await.unwrap();
    assert_eq!(checked.spiffe_id().to_string(), Node::id("rust"));
    // The refusal is audited with its caller.
    let denied = node.broker.events().into_iter().any(|e| {
        matches!(e, Event::Denial { kind, caller: Some(c), .. } if kind == "x509-svid" && c.exe.ends_with("/nobody"))
    });
    assert!(denied, "the refused caller is in the log");
}

/// SVIDs as files (spiffe-helper's names), kept fresh by the agent's sinks
/// for itself: here the node's own ID.
#[test]
fn svid_sinks_write_spiffe_helper_files() {
    let sinks = r#"
[[sink]]
name = "svid"
kind = "x509-svid"
role = "spiffe"
cert = "{dir}/out/svid.pem"
key = "{dir}/out/svid_key.pem"
ca = "{dir}/out/svid_bundle.pem"

[[sink]]
name = "jwt"
kind = "jwt-svid"
role = "spiffe"
audiences = ["https://api.example.org"]
token = "{dir}/out/jwt_svid.token"
ca = "{dir}/out/jwt_bundle.json"
"#;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut node = Node::start_with(&policy(), &sinks.replace("{dir}", &dir.path().display().to_string()));
    node.agent.wait_line("grantline-agent sink svid written");
    node.agent.wait_line("grantline-agent sink jwt written");
    let p = |n: &str| out.join(n).display().to_string();
    assert_eq!(grantline_tests::mode(&out.join("svid_key.pem")) & 0o777, 0o600);
    let (ok, text) =
        openssl(&["verify", "-CAfile", &p("svid_bundle.pem"), "-untrusted", &p("svid.pem"), &p("svid.pem")]);
    assert!(ok, "{text}");
    let (_, text) = openssl(&["x509", "-in", &p("svid.pem"), "-noout", "-ext", "subjectAltName"]);
    assert!(text.contains(&format!("URI:{}", Node::id("node/node-1"))), "{text}");
    let (ok, text) = openssl(&["pkey", "-in", &p("svid_key.pem"), "-noout"]);
    assert!(ok, "the key is PKCS#8 PEM: {text}");
    let token = std::fs::read_to_string(out.join("jwt_svid.token")).unwrap();
    let jwks: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("jwt_bundle.json")).unwrap()).unwrap();
    assert_eq!(jwks["keys"][0]["use"], "jwt-svid");
    let v = node.client("backend", &["validate", token.trim(), AUDIENCE]);
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["spiffe_id"], Node::id("node/node-1"), "{v}");
}
