//! Interoperability: the published checkpoints, entries and proofs check out
//! with independent implementations of the C2SP formats and RFC 6962
//! (Cloudflare's `signed_note` and `tlog_tiles`, ports of Go's
//! `golang.org/x/mod/sumdb/note` and `tlog`).

#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::process::Command;

use grantline_proto::audit::merkle::{self, MemoryTree};
use grantline_proto::audit::tiles;
use grantline_tests::{bin, stderr, Agent, Broker};
use signed_note::{Note, StandardVerifier, VerifierList};
use tlog_tiles::{Hash as TlogHash, HashReader};

/// Go-style stored hashes in memory (tlog's own layout, built by tlog itself).
struct Stored(RefCell<Vec<TlogHash>>);

impl HashReader for Stored {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<TlogHash>, tlog_tiles::Error> {
        let v = self.0.borrow();
        indexes
            .iter()
            .map(|&i| v.get(usize::try_from(i).unwrap()).copied().ok_or(tlog_tiles::Error::IndexesNotInTree))
            .collect()
    }
}

#[test]
fn checkpoint_entries_and_proofs_verify_with_independent_implementations() {
    let broker = stopped_broker_with_grants("interop", &["x509", "--role", "dev", "--san"], 9);
    let anchor = broker.path("anchor");
    let vkey = std::fs::read_to_string(broker.path("audit.vkey")).unwrap();

    // The checkpoint is a signed note under signed_note's own verifier.
    let note_bytes = std::fs::read(anchor.join("checkpoint")).unwrap();
    let note = Note::from_bytes(&note_bytes).unwrap();
    let verifier = StandardVerifier::new(vkey.trim()).unwrap();
    let (verified, _) = note.verify(&VerifierList::new(vec![Box::new(verifier)])).unwrap();
    assert_eq!(verified.len(), 1);
    let cp = tlog_tiles::Checkpoint::from_bytes(note.text()).unwrap();
    assert_eq!(cp.origin(), vkey.split('+').next().unwrap());
    let size = cp.size();

    // Its root is what tlog computes from the published entry bundles.
    let stored = Stored(RefCell::new(Vec::new()));
    let mut ours = MemoryTree::default();
    let mut leaves = Vec::new();
    for t in tiles::new_tiles(0, 0, size) {
        let bytes = std::fs::read(anchor.join(tiles::bundle_path(t.index, t.width))).unwrap();
        for entry in tiles::parse_bundle(&bytes).unwrap() {
            let n = leaves.len() as u64;
            let new = tlog_tiles::stored_hashes(n, entry, &stored).unwrap();
            stored.0.borrow_mut().extend(new);
            let leaf = tlog_tiles::record_hash(entry);
            leaves.push(leaf);
            ours.push(leaf.0);
        }
    }
    assert_eq!(leaves.len() as u64, size);
    let root = tlog_tiles::tree_hash(size, &stored).unwrap();
    assert_eq!(&root, cp.hash(), "tlog's root of the entries differs from the checkpoint");

    // Our inclusion proofs (from `grantline audit prove`) check with tlog,
    // and tlog's proofs check with ours.
    for index in 0..size {
        let out = Command::new(bin("grantline"))
            .args(["audit", "prove", "--db"])
            .arg(broker.path("audit.db"))
            .args(["--index", &index.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let receipt =
            grantline_proto::audit::checkpoint::InclusionReceipt::parse(&String::from_utf8(out.stdout).unwrap())
                .unwrap();
        let proof: Vec<TlogHash> = receipt.proof.iter().map(|h| TlogHash(*h)).collect();
        tlog_tiles::check_record(&proof, size, root, index, leaves[usize::try_from(index).unwrap()]).unwrap();
        let theirs = tlog_tiles::prove_record(size, index, &stored).unwrap();
        let theirs: Vec<[u8; 32]> = theirs.iter().map(|h| h.0).collect();
        assert!(merkle::verify_inclusion(&leaves[usize::try_from(index).unwrap()].0, index, size, &theirs, &root.0));
    }

    // Consistency proofs between every pair of sizes, both ways.
    for old in 1..=size {
        let old_root = tlog_tiles::tree_hash(old, &stored).unwrap();
        assert_eq!(old_root.0, merkle::root(&ours, old).unwrap());
        let proof: Vec<TlogHash> =
            merkle::consistency_proof(&ours, old, size).unwrap().into_iter().map(TlogHash).collect();
        tlog_tiles::check_tree(&proof, size, root, old, old_root).unwrap();
        let theirs: Vec<[u8; 32]> = tlog_tiles::prove_tree(size, old, &stored).unwrap().iter().map(|h| h.0).collect();
        assert!(merkle::verify_consistency(old, size, &old_root.0, &root.0, &theirs));
    }

    // The CLI's consistency proof from an older size checks with tlog too.
    let out = Command::new(bin("grantline"))
        .args(["audit", "prove", "--db"])
        .arg(broker.path("audit.db"))
        .args(["--old-size", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, _checkpoint) = text.split_once("\n\n").unwrap();
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("grantline/consistency-proof@v1"));
    assert_eq!(lines.next(), Some("old 3"));
    assert_eq!(lines.next(), Some(format!("new {size}").as_str()));
    let proof: Vec<TlogHash> = lines.map(|l| TlogHash::parse_hash(l).unwrap()).collect();
    tlog_tiles::check_tree(&proof, size, root, 3, tlog_tiles::tree_hash(3, &stored).unwrap()).unwrap();

    // Level-0 tiles hold tlog's record hashes.
    let t = tiles::new_tiles(0, 0, size)[0];
    let tile = std::fs::read(anchor.join(tiles::tile_path(0, t.index, t.width))).unwrap();
    let expect: Vec<u8> = leaves.iter().take(usize::try_from(t.width).unwrap()).flat_map(|h| h.0).collect();
    assert_eq!(tile, expect);
}

/// Go's own note and tlog packages (Debian golang-golang-x-mod-dev, GOPATH
/// mode) verify the anchor: checkpoint, root, every proof, and our receipts.
#[test]
fn go_sumdb_note_and_tlog_verify_the_anchor_and_receipts() {
    let broker = stopped_broker_with_grants("go-interop", &["ssh", "--role", "dev", "--principal"], 6);
    let proofs = tempfile::tempdir().unwrap();
    let mut proof_files = Vec::new();
    for index in [0u64, 3, 7] {
        let out = Command::new(bin("grantline"))
            .args(["audit", "prove", "--db"])
            .arg(broker.path("audit.db"))
            .args(["--index", &index.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let f = proofs.path().join(format!("{index}.tlog-proof"));
        std::fs::write(&f, out.stdout).unwrap();
        proof_files.push(f);
    }
    let gocache = tempfile::tempdir().unwrap();
    let vkey = std::fs::read_to_string(broker.path("audit.vkey")).unwrap();
    let go = go_verify(gocache.path(), vkey.trim(), &broker.path("anchor"), &proof_files);
    assert!(
        go.status.success(),
        "Go's tlog rejected the anchor: {}{}",
        String::from_utf8_lossy(&go.stdout),
        stderr(&go)
    );
    // Genesis, the dev broker's and the agent's join tokens' creation, the
    // enrollment and six grants.
    assert!(String::from_utf8_lossy(&go.stdout).starts_with("ok 10"), "{}", String::from_utf8_lossy(&go.stdout));

    // And Go notices a tampered entry bundle.
    // The widest partial entry bundle, the one the final checkpoint reads
    // (the log has fewer than 256 entries; an earlier publication may have
    // left a narrower one beside it, which no verifier of the final
    // checkpoint reads).
    let bundle = std::fs::read_dir(broker.path("anchor/tile/entries/000.p"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| p.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u32>().ok()).unwrap_or(0))
        .unwrap();
    let mut bytes = std::fs::read(&bundle).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 1;
    std::fs::write(&bundle, bytes).unwrap();
    let go = go_verify(gocache.path(), vkey.trim(), &broker.path("anchor"), &[]);
    assert!(!go.status.success(), "Go accepted a tampered anchor");
}

/// A dev broker that granted `n` credentials (`get` with `args` and a name),
/// stopped with SIGTERM so its anchor holds the final checkpoint.
fn stopped_broker_with_grants(node: &str, args: &[&str], n: usize) -> Broker {
    let mut broker = Broker::start();
    let agent = Agent::start(&broker, node);
    for i in 0..n {
        let out = tempfile::tempdir().unwrap();
        let name = format!("{node}{i}.example.com");
        let got = agent.get(&[args, &[name.as_str(), "--out", out.path().to_str().unwrap()]].concat());
        assert!(got.status.success(), "{}", stderr(&got));
    }
    broker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(broker.proc.wait().success());
    broker
}

/// Runs `tests/go/verify_anchor.go` in GOPATH mode against Debian's x/mod.
fn go_verify(
    cache: &std::path::Path,
    vkey: &str,
    anchor: &std::path::Path,
    proofs: &[std::path::PathBuf],
) -> std::process::Output {
    Command::new("go")
        .arg("run")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("go/verify_anchor.go"))
        .arg(vkey)
        .arg(anchor)
        .args(proofs)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", cache)
        .env("GOFLAGS", "")
        .output()
        .expect("go is needed (scripts/install-test-deps.sh installs golang-go and golang-golang-x-mod-dev)")
}
