//! The broker's hot path, piece by piece: policy decision, CSR check, leaf and
//! SSH signing, durable audit appends with group commit, and the raw crypto
//! bound per grant.
//! `cargo bench -p grantline-daemon --bench broker`
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use divan::counter::ItemsCount;
use grantline_daemon::audit::AuditLog;
use grantline_daemon::issuer::embedded::EmbeddedIssuer;
use grantline_daemon::issuer::{check_csr, Issuer, Order, What};
use grantline_daemon::pki::Pki;
use grantline_daemon::policy::{decide, Kind, NodeAttrs, Policy, PolicyRequest, DEV_POLICY};
use grantline_proto::audit::{Event, SignerKey};

struct Fixture {
    _dir: tempfile::TempDir,
    pki: Arc<Pki>,
    csr_der: Vec<u8>,
    ssh_key: ssh_key::PublicKey,
}

static FIX: LazyLock<Fixture> = LazyLock::new(|| {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(Pki::load_or_create(dir.path(), &["localhost".into()]).unwrap());
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec!["svc.example.com".into()]).unwrap().serialize_request(&key).unwrap();
    let ssh = ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
    Fixture { _dir: dir, pki, csr_der: csr.der().to_vec(), ssh_key: ssh.public_key().clone() }
});

fn main() {
    divan::main();
}

#[divan::bench]
fn policy_decide(bencher: divan::Bencher) {
    let policy = Policy::parse(DEV_POLICY).unwrap();
    let node = NodeAttrs { name: "web-1".into(), labels: Default::default() };
    let names = vec!["web-1.example.com".to_owned()];
    bencher.bench(|| {
        let ask = PolicyRequest { kind: Kind::X509, role: "dev", ttl: None, names: &names, caller: None, spiffe: None };
        decide(&policy, &ask, &node)
    });
}

#[divan::bench]
fn csr_check(bencher: divan::Bencher) {
    let der = FIX.csr_der.clone();
    bencher.bench(|| check_csr(&der).unwrap());
}

#[divan::bench]
fn x509_leaf_sign(bencher: divan::Bencher) {
    let issuer = EmbeddedIssuer::new(FIX.pki.clone());
    let order = Order {
        node: "web-1".into(),
        role: "dev".into(),
        ttl: Duration::from_secs(600),
        what: What::X509 { csr: check_csr(&FIX.csr_der).unwrap(), sans: vec!["svc.example.com".into()] },
    };
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    bencher.bench(|| rt.block_on(issuer.issue(&order)).unwrap());
}

/// The machine's raw crypto per X.509 grant, with nothing else: the CSR's
/// signature checked, the leaf signed, the audit entry signed. One core's
/// grants/s cannot exceed 1 / this; the broker's share of the limit is how
/// close the end-to-end rate gets (RFD 0008).
#[divan::bench]
fn raw_crypto_per_grant(bencher: divan::Bencher) {
    let issuer = EmbeddedIssuer::new(FIX.pki.clone());
    let key = SignerKey::generate("bench.example/log").unwrap();
    let entry = vec![7u8; 600];
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    bencher.bench(|| {
        let csr = check_csr(&FIX.csr_der).unwrap();
        let order = Order {
            node: "web-1".into(),
            role: "dev".into(),
            ttl: Duration::from_secs(600),
            what: What::X509 { csr, sans: vec!["svc.example.com".into()] },
        };
        let issued = rt.block_on(issuer.issue(&order)).unwrap();
        (issued, key.sign(&entry))
    });
}

#[divan::bench]
fn ssh_cert_sign(bencher: divan::Bencher) {
    let issuer = EmbeddedIssuer::new(FIX.pki.clone());
    let order = Order {
        node: "web-1".into(),
        role: "dev".into(),
        ttl: Duration::from_secs(600),
        what: What::Ssh { public_key: FIX.ssh_key.clone(), principals: vec!["alice".into()], host: false },
    };
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    bencher.bench(|| rt.block_on(issuer.issue(&order)).unwrap());
}

/// 4,096 appends in flight at once, each awaited until durable: the rate the
/// single writer sustains with group commit and synchronous=FULL on this disk.
#[divan::bench(sample_count = 10)]
fn audit_append_durable(bencher: divan::Bencher) {
    let event = Event::Denial {
        action: "grant".into(),
        node: "web-1".into(),
        kind: "x509".into(),
        role: "dev".into(),
        policy: "9f".repeat(32),
        reason: "bench".into(),
        caller: None,
    };
    append_in_flight(bencher, &event);
}

/// The same with grant entries, which also add a row to the credential
/// inventory in the same transaction (RFD 0006).
#[divan::bench(sample_count = 10)]
fn audit_append_durable_grants(bencher: divan::Bencher) {
    let event = Event::Grant {
        node: "web-1".into(),
        kind: "x509".into(),
        role: "dev".into(),
        rule: "dev".into(),
        policy: "9f".repeat(32),
        ttl_seconds: 600,
        serial: "7f".repeat(16),
        fingerprint: "ab".repeat(32),
        names: vec!["web-1.example.com".into()],
        not_after: 4_102_444_800,
        caller: Some(grantline_proto::audit::event::CallerInfo {
            uid: 33,
            gid: 33,
            pid: 4242,
            exe: "/usr/sbin/nginx".into(),
            unit: "nginx.service".into(),
        }),
        spiffe_id: String::new(),
        audience: Vec::new(),
    };
    append_in_flight(bencher, &event);
}

fn append_in_flight(bencher: divan::Bencher, event: &Event) {
    const IN_FLIGHT: usize = 4096;
    let dir = tempfile::tempdir().unwrap();
    let key = SignerKey::generate("bench.example/log").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let (log, _writer) = AuditLog::start(&dir.path().join("audit.db"), key, "bench").unwrap();
    bencher.counter(ItemsCount::new(IN_FLIGHT)).bench(|| {
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..IN_FLIGHT {
                let log = log.clone();
                let event = event.clone();
                set.spawn(async move { log.append(event).await.unwrap() });
            }
            while set.join_next().await.is_some() {}
        });
    });
}
