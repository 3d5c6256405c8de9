use super::*;
use crate::audit::key::SignerKey;

fn grant(i: u64) -> Event {
    Event::Denial {
        action: "grant".into(),
        node: format!("node-{i}"),
        kind: "x509".into(),
        role: "dev".into(),
        policy: String::new(),
        reason: "test".into(),
        caller: None,
    }
}

fn build(key: &SignerKey, n: u64) -> Vec<StoredEntry> {
    let origin = key.verifier().name().to_owned();
    let mut prev = ZERO_HASH;
    let mut out = Vec::new();
    for seq in 0..n {
        let event = if seq == 0 {
            Event::Genesis { vkey: key.verifier().to_string(), software: "test".into() }
        } else {
            grant(seq)
        };
        let bytes = Entry::encode(&origin, seq, 1000 + i64::try_from(seq).unwrap(), &prev, &event);
        prev = leaf_hash(&bytes);
        out.push(StoredEntry {
            seq: i64::try_from(seq).unwrap(),
            signature: key.sign(&bytes).to_vec(),
            hash: prev.to_vec(),
            entry: bytes,
        });
    }
    out
}

fn run(key: &VerifierKey, rows: Vec<StoredEntry>) -> Result<Summary, Failure> {
    let mut v = ChainVerifier::new(key.clone());
    for r in rows {
        v.push(r)?;
    }
    v.finish()
}

#[test]
fn sound_log_verifies() {
    let k = SignerKey::generate("t.example/log").unwrap();
    let mut v = ChainVerifier::new(k.verifier().clone());
    v.want_root_at(700);
    v.want_root_at(5000);
    let rows = build(&k, 1500);
    let mut tree = merkle::MemoryTree::default();
    for r in rows {
        tree.push(r.hash.clone().try_into().unwrap());
        v.push(r).unwrap();
    }
    let s = v.finish().unwrap();
    assert_eq!(s.entries, 1500);
    assert_eq!(s.root, hex::encode(tree.root()));
    assert_eq!(s.roots.get(&700), Some(&merkle::root(&tree, 700).unwrap()));
    assert_eq!(s.roots.get(&5000), None, "no root for a size the log never reached");
}

#[test]
fn an_empty_log_proves_nothing() {
    let k = SignerKey::generate("t.example/log").unwrap();
    let f = run(k.verifier(), Vec::new()).unwrap_err();
    assert_eq!(f.seq, 0);
    assert!(f.reason.contains("the log is empty") && f.reason.contains("proves nothing"), "{f}");
}

/// The review's forgery: a log started by the attacker's key under the
/// real origin, every entry signed by it, ending in a rotation that names
/// the real key. Nothing in it was signed by the real key.
#[test]
fn a_log_forged_under_another_key_that_rotates_to_the_real_one_is_refused() {
    let real = SignerKey::generate("t.example/log").unwrap();
    let evil = SignerKey::generate("t.example/log").unwrap();
    let log = rotated(&evil, &real, 20, 19, |_| 1);
    let f = run(real.verifier(), log).unwrap_err();
    assert_eq!(f.seq, 0, "{f}");
    assert!(f.reason.contains("not by the key given"), "{f}");
}

#[test]
fn edited_event_byte_is_named() {
    let k = SignerKey::generate("t.example/log").unwrap();
    let mut rows = build(&k, 700);
    let last = rows[600].entry.len() - 3;
    rows[600].entry[last] ^= 0x01;
    let f = run(k.verifier(), rows.clone()).unwrap_err();
    assert_eq!(f.seq, 600);
    assert!(f.reason.contains("hash"), "{f}");
    // Recomputing the stored hash moves the failure to the signature and the next link.
    rows[600].hash = leaf_hash(&rows[600].entry).to_vec();
    let f = run(k.verifier(), rows).unwrap_err();
    assert_eq!(f.seq, 600);
    assert!(f.reason.contains("signature"), "{f}");
}

#[test]
fn deletion_swap_duplicate_wrong_key() {
    let k = SignerKey::generate("t.example/log").unwrap();
    let rows = build(&k, 50);

    let mut deleted = rows.clone();
    deleted.remove(20);
    let f = run(k.verifier(), deleted).unwrap_err();
    assert_eq!((f.seq, f.reason.contains("gap")), (21, true), "{f}");

    let mut swapped = rows.clone();
    swapped.swap(30, 31);
    let f = run(k.verifier(), swapped).unwrap_err();
    assert_eq!(f.seq, 31, "{f}");

    // Swapped contents but renumbered rows: the entry's own seq gives it away.
    let mut renumbered = rows.clone();
    renumbered.swap(30, 31);
    renumbered[30].seq = 30;
    renumbered[31].seq = 31;
    let f = run(k.verifier(), renumbered).unwrap_err();
    assert_eq!(f.seq, 30);
    assert!(f.reason.contains("says it is seq 31"), "{f}");

    let mut dup = rows.clone();
    dup.insert(11, rows[10].clone());
    let f = run(k.verifier(), dup).unwrap_err();
    assert_eq!(f.seq, 10, "{f}");

    let other = SignerKey::generate("t.example/log").unwrap();
    let f = run(other.verifier(), rows).unwrap_err();
    assert_eq!(f.seq, 0);
    assert!(f.reason.contains("started by key"), "{f}");
}

#[test]
fn forged_signature_by_other_key_is_named() {
    let k = SignerKey::generate("t.example/log").unwrap();
    let evil = SignerKey::generate("t.example/log").unwrap();
    let mut rows = build(&k, 900);
    rows[700].signature = evil.sign(&rows[700].entry).to_vec();
    let f = run(k.verifier(), rows).unwrap_err();
    assert_eq!(f.seq, 700);
    assert!(f.reason.contains("signature"), "{f}");
}

/// Rebuilds a log from `events` (as (origin, time) pairs per seq), signed
/// by `key`: what an attacker holding the key could write.
fn forge(key: &SignerKey, rows: &[(String, i64, Event)]) -> Vec<StoredEntry> {
    let mut prev = ZERO_HASH;
    rows.iter()
        .enumerate()
        .map(|(seq, (origin, time, event))| {
            let bytes = Entry::encode(origin, seq as u64, *time, &prev, event);
            prev = leaf_hash(&bytes);
            StoredEntry { seq: seq as i64, signature: key.sign(&bytes).to_vec(), hash: prev.to_vec(), entry: bytes }
        })
        .collect()
}

fn honest_rows(key: &SignerKey, n: i64) -> Vec<(String, i64, Event)> {
    let origin = key.verifier().name().to_owned();
    (0..n)
        .map(|i| {
            let event = if i == 0 {
                Event::Genesis { vkey: key.verifier().to_string(), software: "t".into() }
            } else {
                grant(u64::try_from(i).unwrap())
            };
            (origin.clone(), 1000 + i, event)
        })
        .collect()
}

#[test]
fn an_inserted_entry_is_named() {
    let k = SignerKey::generate("t.example/log").unwrap();
    let mut rows = build(&k, 40);
    // A well-formed entry slipped in at seq 20, later rows renumbered.
    let mut forged = build(&k, 40)[20].clone();
    forged.entry = Entry::encode(k.verifier().name(), 20, 1020, &[9; 32], &grant(99));
    forged.hash = leaf_hash(&forged.entry).to_vec();
    forged.signature = k.sign(&forged.entry).to_vec();
    rows.insert(20, forged);
    for (i, r) in rows.iter_mut().enumerate() {
        r.seq = i as i64;
    }
    let f = run(k.verifier(), rows).unwrap_err();
    assert_eq!(f.seq, 20, "{f}");
    assert!(f.reason.contains("broken chain"), "{f}");
}

#[test]
fn a_broken_chain_link_is_named_even_when_signed() {
    let k = SignerKey::generate("t.example/log").unwrap();
    let mut rows = forge(&k, &honest_rows(&k, 30));
    // Entry 15 re-written and re-signed by the key holder: its own hash and
    // signature are fine, but entry 16 still links to the original.
    let mut rewritten = honest_rows(&k, 30);
    rewritten[15].2 = grant(1500);
    let rewritten = forge(&k, &rewritten);
    rows[15] = rewritten[15].clone();
    let f = run(k.verifier(), rows).unwrap_err();
    assert_eq!(f.seq, 16, "{f}");
    assert!(f.reason.contains("broken chain"), "{f}");
}

#[test]
fn an_entry_from_another_origin_is_named() {
    let k = SignerKey::generate("t.example/log").unwrap();
    let mut rows = honest_rows(&k, 30);
    rows[12].0 = "t.example/other-log".into();
    let f = run(k.verifier(), forge(&k, &rows)).unwrap_err();
    assert_eq!(f.seq, 12, "{f}");
    assert!(f.reason.contains("from log \"t.example/other-log\""), "{f}");
}

#[test]
fn time_going_backwards_is_named() {
    let k = SignerKey::generate("t.example/log").unwrap();
    let mut rows = honest_rows(&k, 30);
    rows[9].1 = 5;
    let f = run(k.verifier(), forge(&k, &rows)).unwrap_err();
    assert_eq!(f.seq, 9, "{f}");
    assert!(f.reason.contains("time goes backwards"), "{f}");
}

/// A log of `n` entries whose key rotates from `k1` to `k2` at `at`;
/// `signer(seq)` picks who actually signs each entry.
fn rotated(k1: &SignerKey, k2: &SignerKey, n: u64, at: u64, signer: impl Fn(u64) -> u8) -> Vec<StoredEntry> {
    let origin = k1.verifier().name().to_owned();
    let mut prev = ZERO_HASH;
    (0..n)
        .map(|seq| {
            let event = match seq {
                0 => Event::Genesis { vkey: k1.verifier().to_string(), software: "test".into() },
                s if s == at => Event::KeyRotation { new_vkey: k2.verifier().to_string() },
                s => grant(s),
            };
            let bytes = Entry::encode(&origin, seq, 1000, &prev, &event);
            prev = leaf_hash(&bytes);
            let key = if signer(seq) == 1 { k1 } else { k2 };
            StoredEntry {
                seq: i64::try_from(seq).unwrap(),
                signature: key.sign(&bytes).to_vec(),
                hash: prev.to_vec(),
                entry: bytes,
            }
        })
        .collect()
}

#[test]
fn verification_follows_key_rotation() {
    let k1 = SignerKey::generate("t.example/log").unwrap();
    let k2 = SignerKey::generate("t.example/log").unwrap();
    let k3 = SignerKey::generate("t.example/log").unwrap();
    let honest = |seq: u64| if seq <= 600 { 1 } else { 2 };
    let log = rotated(&k1, &k2, 1200, 600, honest);
    let s = run(k1.verifier(), log.clone()).unwrap();
    assert_eq!(s.keys, vec![k1.verifier().clone(), k2.verifier().clone()]);
    // The later key alone does not vouch for the entries before it: the
    // caller must trust the key that started the log (the key history).
    let f = run(k2.verifier(), log.clone()).unwrap_err();
    assert_eq!(f.seq, 0, "{f}");
    assert!(f.reason.contains("audit.vkeys"), "{f}");
    let mut history = ChainVerifier::trusting(vec![k1.verifier().clone(), k2.verifier().clone()]);
    for r in log.clone() {
        history.push(r).unwrap();
    }
    assert_eq!(history.finish().unwrap().entries, 1200);
    let f = run(k3.verifier(), log).unwrap_err();
    assert!(f.reason.contains("not by the key given"), "{f}");

    // The old key signing after the rotation, or the new one signing the
    // rotation itself, is caught at that seq.
    let f = run(k1.verifier(), rotated(&k1, &k2, 1200, 600, |s| if s == 601 { 1 } else { honest(s) })).unwrap_err();
    assert_eq!(f.seq, 601, "{f}");
    let f = run(k1.verifier(), rotated(&k1, &k2, 1200, 600, |s| if s < 600 { 1 } else { 2 })).unwrap_err();
    assert_eq!(f.seq, 600, "{f}");
}

fn run_history(keys: &[&SignerKey], rows: Vec<StoredEntry>) -> Result<Summary, Failure> {
    let mut v = ChainVerifier::trusting(keys.iter().map(|k| k.verifier().clone()).collect());
    for r in rows {
        v.push(r)?;
    }
    v.finish()
}

/// The review's second forgery: the broker rotated k1 -> k2, and a
/// holder of the retired k1 writes a log of its own. Under the history
/// [k1, k2] it must not verify: it ends under k1, or it ends with a
/// rotation to k2 that k2 never signed anything after (flagged for the
/// caller, who then needs a checkpoint signed by k2).
#[test]
fn a_retired_key_cannot_forge_a_log_the_key_history_accepts() {
    let k1 = SignerKey::generate("t.example/log").unwrap();
    let k2 = SignerKey::generate("t.example/log").unwrap();
    let k3 = SignerKey::generate("t.example/log").unwrap();
    // The honest log verifies under the history, with nothing to endorse.
    let honest = rotated(&k1, &k2, 50, 20, |s| if s <= 20 { 1 } else { 2 });
    assert_eq!(run_history(&[&k1, &k2], honest.clone()).unwrap().unendorsed_rotation, None);
    // k1 alone, never rotating.
    let f = run_history(&[&k1, &k2], build(&k1, 30)).unwrap_err();
    assert!(f.reason.contains("continues to"), "{f}");
    // k1 rotating to k2 as its very last entry: flagged.
    let forged = rotated(&k1, &k2, 30, 29, |_| 1);
    assert_eq!(run_history(&[&k1, &k2], forged).unwrap().unendorsed_rotation, Some(29));
    // k1 rotating to a key of the attacker's: not the history's next key.
    let f = run_history(&[&k1, &k2], rotated(&k1, &k3, 30, 10, |s| if s <= 10 { 1 } else { 2 }));
    assert!(f.is_err(), "a rotation away from the history verified");
    // The history must start with the genesis key.
    assert!(run_history(&[&k2, &k1], honest).is_err());
}

#[test]
fn chain_failure_after_bad_signature_reports_the_signature() {
    let k = SignerKey::generate("t.example/log").unwrap();
    let mut rows = build(&k, 100);
    rows[10].signature[0] ^= 1;
    rows.remove(50);
    let f = run(k.verifier(), rows).unwrap_err();
    assert_eq!(f.seq, 10, "{f}");
}

/// What a log built by someone holding every key but the trusted one can
/// prove: the verdict must be "sound" exactly when the trusted key signed
/// the genesis and every later entry is signed by the key in force, each
/// key reached from the trusted one by a rotation its predecessor signed.
/// The model below is that rule written independently of the verifier.
#[test]
fn property_only_keys_reached_from_the_trusted_one_make_a_log_sound() {
    use rand::{Rng, SeedableRng};

    #[derive(Clone, Copy, Debug)]
    enum Step {
        Genesis(usize),
        Rotate(usize),
        Plain,
    }

    fn model(steps: &[(Step, usize)], trusted: usize) -> bool {
        let Some(&(Step::Genesis(first), signer)) = steps.first() else { return false };
        if first != trusted || signer != trusted {
            return false;
        }
        let (mut in_force, mut used) = (first, vec![first]);
        for &(step, signer) in &steps[1..] {
            if signer != in_force {
                return false;
            }
            match step {
                Step::Genesis(_) => return false,
                Step::Rotate(new) if used.contains(&new) => return false,
                Step::Rotate(new) => {
                    used.push(new);
                    in_force = new;
                }
                Step::Plain => {}
            }
        }
        true
    }

    let keys: Vec<SignerKey> = (0..5).map(|_| SignerKey::generate("t.example/log").unwrap()).collect();
    let origin = keys[0].verifier().name().to_owned();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6772_616e_746c_696e);
    let (mut sound, mut unsound) = (0, 0);
    for _ in 0..3000 {
        let len = rng.gen_range(0..10);
        // The attacker mostly follows the rules, so that both verdicts
        // occur often; each deviation is one the model must catch.
        let mut in_force = if rng.gen_bool(0.7) { 0 } else { rng.gen_range(0..keys.len()) };
        let mut steps = Vec::new();
        for seq in 0..len {
            let step = match (seq, rng.gen_range(0..10)) {
                (0, _) | (_, 0) => Step::Genesis(if seq == 0 { in_force } else { rng.gen_range(0..keys.len()) }),
                (_, 1 | 2) => Step::Rotate(rng.gen_range(0..keys.len())),
                _ => Step::Plain,
            };
            let signer = if rng.gen_bool(0.9) { in_force } else { rng.gen_range(0..keys.len()) };
            if let Step::Rotate(new) = step {
                in_force = new;
            }
            steps.push((step, signer));
        }
        let mut prev = ZERO_HASH;
        let rows: Vec<StoredEntry> = steps
            .iter()
            .enumerate()
            .map(|(seq, &(step, signer))| {
                let event = match step {
                    Step::Genesis(k) => Event::Genesis { vkey: keys[k].verifier().to_string(), software: "t".into() },
                    Step::Rotate(k) => Event::KeyRotation { new_vkey: keys[k].verifier().to_string() },
                    Step::Plain => grant(seq as u64),
                };
                let bytes = Entry::encode(&origin, seq as u64, 1000, &prev, &event);
                prev = leaf_hash(&bytes);
                StoredEntry {
                    seq: seq as i64,
                    signature: keys[signer].sign(&bytes).to_vec(),
                    hash: prev.to_vec(),
                    entry: bytes,
                }
            })
            .collect();
        let verdict = run(keys[0].verifier(), rows).is_ok();
        assert_eq!(verdict, model(&steps, 0), "steps {steps:?}");
        if verdict {
            sound += 1;
        } else {
            unsound += 1;
        }
    }
    assert!(sound > 300 && unsound > 300, "both verdicts must be exercised: {sound} sound, {unsound} unsound");
}
