//! Audit core speed: sealing entries, and verifying a log with and without
//! signature checks. `cargo bench -p grantline-proto --bench audit`
#![allow(clippy::unwrap_used)]

use std::sync::LazyLock;

use divan::counter::ItemsCount;
use grantline_proto::audit::entry::leaf_hash;
use grantline_proto::audit::{ChainVerifier, Entry, Event, SignerKey, StoredEntry, ZERO_HASH};

const N: usize = 20_000;

fn grant(i: usize) -> Event {
    Event::Grant {
        node: format!("node-{i:06}"),
        kind: "x509".into(),
        role: "web".into(),
        rule: "web".into(),
        policy: "9f".repeat(32),
        ttl_seconds: 600,
        serial: "4a".repeat(16),
        fingerprint: "c3".repeat(32),
        names: vec![format!("node-{i:06}.example.com")],
        not_after: 1_800_000_000,
        caller: None,
        spiffe_id: String::new(),
        audience: Vec::new(),
    }
}

static KEY: LazyLock<SignerKey> = LazyLock::new(|| SignerKey::generate("bench.example/log").unwrap());

static LOG: LazyLock<Vec<StoredEntry>> = LazyLock::new(|| {
    let key = &*KEY;
    let mut prev = ZERO_HASH;
    (0..N)
        .map(|i| {
            let event = if i == 0 {
                Event::Genesis { vkey: key.verifier().to_string(), software: "bench".into() }
            } else {
                grant(i)
            };
            let bytes = Entry::encode(key.verifier().name(), i as u64, 1_700_000_000_000 + i as i64, &prev, &event);
            prev = leaf_hash(&bytes);
            StoredEntry { seq: i as i64, signature: key.sign(&bytes).to_vec(), hash: prev.to_vec(), entry: bytes }
        })
        .collect()
});

fn main() {
    divan::main();
}

/// Encode, hash and sign one entry: the writer's CPU cost per append.
#[divan::bench]
fn seal_entry(bencher: divan::Bencher) {
    let key = &*KEY;
    let event = grant(7);
    let prev = [1u8; 32];
    bencher.counter(ItemsCount::new(1usize)).bench(|| {
        let bytes = Entry::encode(key.verifier().name(), 7, 1_700_000_000_000, &prev, &event);
        (leaf_hash(&bytes), key.sign(&bytes))
    });
}

/// Full verification: encoding, hashes, chain, events and every signature.
#[divan::bench(sample_count = 10)]
fn verify_with_signatures(bencher: divan::Bencher) {
    let log = &*LOG;
    bencher.counter(ItemsCount::new(N)).bench(|| {
        let mut v = ChainVerifier::new(KEY.verifier().clone());
        for row in log.iter().cloned() {
            v.push(row).unwrap();
        }
        v.finish().unwrap()
    });
}

/// Chain and hash checks only.
#[divan::bench(sample_count = 10)]
fn verify_chain_only(bencher: divan::Bencher) {
    let log = &*LOG;
    bencher.counter(ItemsCount::new(N)).bench(|| {
        let mut v = ChainVerifier::new(KEY.verifier().clone()).without_signatures();
        for row in log.iter().cloned() {
            v.push(row).unwrap();
        }
        v.finish().unwrap()
    });
}
