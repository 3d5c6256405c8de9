//! The grant path without sockets: the embedded issuer, a real SQLite audit
//! log and state database in a temporary directory, the node registry.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use grantline_proto::audit::{ChainVerifier, Entry, Event, SignerKey, VerifierKey};
use grantline_proto::kind::Kind;
use grantline_proto::wire;

use super::*;
use crate::audit::{AuditLog, AuditStore};
use crate::issuer::backends::Backends;
use crate::issuer::embedded::EmbeddedIssuer;
use crate::issuer::Issuer;
use crate::pki::Pki;
use crate::policy::{NodeAttrs, Policy};
use crate::registry::Registry;
use crate::state::{NodeRecord, StateDb, StateStore};

const POLICY: &str = r#"
[[rule]]
name = "web"
nodes = ["web-*"]
[[rule.allow]]
kinds = ["x509", "vault-token"]
roles = ["web"]
max_ttl = "1h"
default_ttl = "5m"
sans = ["{node}.example.com"]
vault_policies = ["app-*"]
"#;

struct Fixture {
    dir: tempfile::TempDir,
    service: GrantService,
    registry: Arc<Registry<()>>,
    log: AuditLog,
    writer: std::thread::JoinHandle<()>,
    vkey: VerifierKey,
    policy: Policy,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Arc::new(Pki::load_or_create(dir.path(), &["localhost".into()]).unwrap());
        let key = SignerKey::generate("grant.test/log").unwrap();
        let vkey = key.verifier().clone();
        let (log, writer) = AuditLog::start(&dir.path().join("audit.db"), key, "test").unwrap();
        let state: Arc<dyn StateStore> = Arc::new(StateDb::open(&dir.path().join("state.db")).unwrap());
        let registry = Arc::new(Registry::new(vec![node("web-1")]));
        let embedded: Arc<dyn Issuer> = Arc::new(EmbeddedIssuer::new(pki));
        let issuer = Backends { x509: embedded.clone(), ssh: embedded, vault: None, spiffe: None };
        let service = GrantService {
            issuer: Arc::new(issuer),
            audit: Arc::new(log.clone()),
            state,
            clock: Arc::new(SystemClock),
            nodes: registry.clone(),
            trust_domain: None,
        };
        Self { dir, service, registry, log, writer, vkey, policy: Policy::parse(POLICY).unwrap() }
    }

    async fn grant(&self, r: &wire::GrantRequest) -> Result<wire::GrantResponse, GrantError> {
        let web1 = NodeAttrs { name: "web-1".into(), labels: BTreeMap::new() };
        self.service.grant(&self.policy, &web1, r).await
    }

    /// Stops the writer and returns every event in the log, which must
    /// verify under the log's key.
    fn events(self) -> Vec<Event> {
        drop(self.service);
        drop(self.log);
        self.writer.join().unwrap();
        let store = AuditStore::open_read_only(&self.dir.path().join("audit.db")).unwrap();
        let mut verifier = ChainVerifier::new(self.vkey);
        let mut events = Vec::new();
        store
            .for_each(|row| {
                events.push(Entry::decode(&row.entry).unwrap().event().unwrap());
                verifier.push(row)
            })
            .unwrap()
            .unwrap();
        verifier.finish().unwrap();
        events
    }
}

fn node(name: &str) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        labels: BTreeMap::new(),
        serial: "01".into(),
        previous_serial: String::new(),
        current_seen: true,
        not_after: i64::MAX,
        revoked: false,
        revoked_at: 0,
        last_seen: 0,
        version: 0,
    }
}

fn x509(san: &str) -> wire::GrantRequest {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![san.into()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).unwrap();
    wire::GrantRequest {
        kind: Kind::X509.wire() as i32,
        role: "web".into(),
        csr_der: csr.der().to_vec(),
        sans: vec![san.into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_grant_is_in_the_log_before_it_is_returned() {
    let f = Fixture::new();
    let granted = f.grant(&x509("web-1.example.com")).await.unwrap();
    let receipt = granted.receipt.clone().unwrap();
    let entry = Entry::decode(&receipt.entry).unwrap();
    let Event::Grant { node, kind, rule, fingerprint, names, ttl_seconds, .. } = entry.event().unwrap() else {
        panic!("the receipt is not of a grant")
    };
    assert_eq!((node.as_str(), kind.as_str(), rule.as_str()), ("web-1", "x509", "web"));
    assert_eq!(names, vec!["web-1.example.com".to_owned()]);
    assert!((299..=300).contains(&ttl_seconds), "the rule's default TTL: {ttl_seconds}");
    let der = rustls_pemfile_first(&granted.cert_pem);
    assert_eq!(
        fingerprint,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&der)),
        "the log names the certificate sent"
    );
    let events = f.events();
    assert!(matches!(events.last(), Some(Event::Grant { .. })), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_outside_policy_is_denied_and_the_denial_recorded() {
    let f = Fixture::new();
    let e = f.grant(&x509("db-1.example.com")).await.unwrap_err();
    assert!(matches!(&e, GrantError::Denied(r) if r.contains("db-1.example.com")), "{e:?}");
    let mut other_role = x509("web-1.example.com");
    other_role.role = "db".into();
    assert!(matches!(f.grant(&other_role).await, Err(GrantError::Denied(_))));
    let denials: Vec<String> = f
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Denial { action, reason, .. } if action == "grant" => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(denials.len(), 2, "{denials:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_is_refused_and_recorded() {
    let f = Fixture::new();
    let unknown = wire::GrantRequest { kind: 0, role: "web".into(), ..Default::default() };
    let e = f.grant(&unknown).await.unwrap_err();
    assert!(matches!(&e, GrantError::BadRequest(m) if m.contains("unknown credential kind")), "{e:?}");
    let no_csr = wire::GrantRequest { csr_der: Vec::new(), ..x509("web-1.example.com") };
    assert!(matches!(f.grant(&no_csr).await, Err(GrantError::BadRequest(m)) if m.contains("CSR")));
    let events = f.events();
    let refused = events
        .iter()
        .filter(|e| matches!(e, Event::Denial { reason, .. } if reason.starts_with("bad request")))
        .count();
    assert_eq!(refused, 2, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_no_backend_mints_is_a_bad_request_and_recorded() {
    let f = Fixture::new();
    let token = wire::GrantRequest {
        kind: Kind::VaultToken.wire() as i32,
        role: "web".into(),
        vault_policies: vec!["app-read".into()],
        ..Default::default()
    };
    let e = f.grant(&token).await.unwrap_err();
    assert!(matches!(&e, GrantError::BadRequest(m) if m.contains("no Vault backend")), "{e:?}");
    let events = f.events();
    assert!(matches!(events.last(), Some(Event::Denial { reason, .. }) if reason.starts_with("issuer failed")));
}

/// A revocation that lands while the credential is minted wins: the grant
/// is in the log (it was decided), but nothing is returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_revoked_before_delivery_gets_nothing() {
    let f = Fixture::new();
    assert!(f.registry.revoke("web-1", 1).is_empty());
    let e = f.grant(&x509("web-1.example.com")).await.unwrap_err();
    assert!(matches!(&e, GrantError::Revoked(m) if m.contains("web-1")), "{e:?}");
    let events = f.events();
    assert!(matches!(events.last(), Some(Event::Grant { node, .. }) if node == "web-1"), "{events:?}");
}

fn rustls_pemfile_first(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap().to_vec()
}
