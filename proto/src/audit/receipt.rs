//! Receipts: the signed entry a broker returns with each credential. An agent
//! accepts a credential only with a receipt that verifies under the broker's
//! pinned audit key and names that very credential.

use super::entry::{Entry, EntryError};
use super::event::Event;
use super::key::VerifierKey;
use crate::wire;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptError {
    #[error("the reply carries no audit receipt")]
    Missing,
    #[error("receipt signature does not verify under the pinned audit key {0}")]
    BadSignature(String),
    #[error("receipt entry is malformed: {0}")]
    Malformed(#[from] EntryError),
    #[error("receipt is from log {found:?}, expected {expected:?}")]
    WrongOrigin { found: String, expected: String },
    #[error("receipt does not name this credential: {0}")]
    Mismatch(String),
}

/// A receipt whose signature and origin checked out.
#[derive(Debug, Clone)]
pub struct CheckedReceipt {
    pub seq: u64,
    pub event: Event,
    /// The key that signed it (differs from the pinned one after a rotation).
    pub key: VerifierKey,
}

/// Verifies a receipt's signature and origin and decodes its event.
pub fn check(receipt: Option<&wire::Receipt>, pinned: &VerifierKey) -> Result<CheckedReceipt, ReceiptError> {
    let r = receipt.ok_or(ReceiptError::Missing)?;
    let key = &current_key(r, pinned)?;
    if !key.verify(&r.entry, &r.signature) {
        return Err(ReceiptError::BadSignature(key.to_string()));
    }
    let entry = Entry::decode(&r.entry)?;
    if entry.origin != key.name() {
        return Err(ReceiptError::WrongOrigin { found: entry.origin.into(), expected: key.name().into() });
    }
    Ok(CheckedReceipt { seq: entry.seq, event: entry.event()?, key: key.clone() })
}

/// The key that signed `receipt`, reached from `pinned` through the key
/// rotations the receipt carries, each signed by the key before it. Returns
/// `pinned` itself when there were none.
pub fn current_key(receipt: &wire::Receipt, pinned: &VerifierKey) -> Result<VerifierKey, ReceiptError> {
    let mut key = pinned.clone();
    let mut passed_pinned = false;
    for rotation in &receipt.rotations {
        let entry = Entry::decode(&rotation.entry)?;
        let Ok(Event::KeyRotation { new_vkey }) = entry.event() else {
            return Err(ReceiptError::Mismatch(format!("entry {} carried as a key rotation is not one", entry.seq)));
        };
        let new = VerifierKey::parse(&new_vkey)
            .map_err(|e| ReceiptError::Mismatch(format!("rotation to an unusable key: {e}")))?;
        // Rotations before the pinned key was introduced are history.
        if !passed_pinned && new == *pinned {
            passed_pinned = true;
            continue;
        }
        if key.verify(&rotation.entry, &rotation.signature) {
            if new.name() != key.name() {
                return Err(ReceiptError::WrongOrigin { found: new.name().into(), expected: key.name().into() });
            }
            key = new;
            passed_pinned = true;
        }
    }
    Ok(key)
}

/// Checks that a receipt records the grant of the credential with `fingerprint`.
pub fn check_grant(
    receipt: Option<&wire::Receipt>,
    key: &VerifierKey,
    fingerprint: &str,
) -> Result<CheckedReceipt, ReceiptError> {
    let checked = check(receipt, key)?;
    match &checked.event {
        Event::Grant { fingerprint: f, .. }
        | Event::Enrollment { fingerprint: f, .. }
        | Event::IdentityRenewal { fingerprint: f, .. }
            if f == fingerprint =>
        {
            Ok(checked)
        }
        other => Err(ReceiptError::Mismatch(format!(
            "entry {} is a {} event for another credential",
            checked.seq,
            other.type_name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::key::SignerKey;
    use crate::audit::{Entry, ZERO_HASH};

    fn signed(key: &SignerKey, seq: u64, event: &Event) -> wire::Receipt {
        let entry = Entry::encode(key.verifier().name(), seq, 1, &ZERO_HASH, event);
        wire::Receipt { signature: key.sign(&entry).to_vec(), entry, rotations: Vec::new() }
    }

    #[test]
    fn receipts_follow_rotations_from_the_pinned_key() {
        let k1 = SignerKey::generate("o.example/log").unwrap();
        let k2 = SignerKey::generate("o.example/log").unwrap();
        let k3 = SignerKey::generate("o.example/log").unwrap();
        let evil = SignerKey::generate("o.example/log").unwrap();
        let rot = |by: &SignerKey, to: &SignerKey, seq| {
            signed(by, seq, &Event::KeyRotation { new_vkey: to.verifier().to_string() })
        };
        let deny = Event::Denial {
            action: "grant".into(),
            node: "n".into(),
            kind: String::new(),
            role: String::new(),
            policy: String::new(),
            reason: "r".into(),
            caller: None,
        };
        let mut r = signed(&k3, 9, &deny);
        r.rotations = vec![rot(&k1, &k2, 3), rot(&k2, &k3, 7)];
        assert_eq!(check(Some(&r), k1.verifier()).unwrap().key, *k3.verifier());
        assert_eq!(check(Some(&r), k2.verifier()).unwrap().key, *k3.verifier());
        assert_eq!(check(Some(&r), k3.verifier()).unwrap().key, *k3.verifier());
        // A rotation not signed by the key in force does not move the key.
        let mut forged = signed(&evil, 9, &deny);
        forged.rotations = vec![rot(&evil, &evil, 3)];
        assert!(matches!(check(Some(&forged), k1.verifier()), Err(ReceiptError::BadSignature(_))));
        let mut not_rotation = signed(&k1, 9, &deny);
        not_rotation.rotations = vec![signed(&k1, 3, &deny)];
        assert!(matches!(check(Some(&not_rotation), k1.verifier()), Err(ReceiptError::Mismatch(_))));
    }
}
