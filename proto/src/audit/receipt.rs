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
    #[error("receipt is not from a broker of this agent's fleet: {0}")]
    NotInFleet(String),
}

/// What an agent checks receipts with: the key of the broker it enrolled
/// at (pinned), and in a fleet the fleet key that endorses the others'.
#[derive(Debug, Clone)]
pub struct Trust {
    pub pinned: VerifierKey,
    pub fleet: Option<VerifierKey>,
}

/// What the fleet key signs to endorse a broker's audit key.
pub fn endorsement_message(vkey: &str) -> Vec<u8> {
    format!("grantline fleet audit key v1\n{vkey}\n").into_bytes()
}

impl Trust {
    /// The key to check `receipt` from (its rotations are followed from
    /// it): the pinned key for the pinned broker's log; for another
    /// broker's, the key the receipt carries, if the fleet key endorsed it.
    pub fn key_for(&self, receipt: &wire::Receipt) -> Result<VerifierKey, ReceiptError> {
        if receipt.endorsed_vkey.is_empty() {
            return Ok(self.pinned.clone());
        }
        if receipt.endorsed_vkey.len() > 512 {
            return Err(ReceiptError::NotInFleet("an endorsed key longer than any verifier key".into()));
        }
        let endorsed = VerifierKey::parse(&receipt.endorsed_vkey)
            .map_err(|e| ReceiptError::NotInFleet(format!("the endorsed key is unusable: {e}")))?;
        if endorsed.name() == self.pinned.name() {
            return Ok(self.pinned.clone());
        }
        let Some(fleet) = &self.fleet else {
            return Err(ReceiptError::NotInFleet(format!(
                "the receipt is from log {:?}, and this agent knows no fleet key (it enrolled at a lone broker)",
                endorsed.name()
            )));
        };
        if !fleet.verify(&endorsement_message(&receipt.endorsed_vkey), &receipt.endorsement) {
            return Err(ReceiptError::NotInFleet(format!(
                "the key of log {:?} is not endorsed by the fleet key {}",
                endorsed.name(),
                fleet.name()
            )));
        }
        Ok(endorsed)
    }

    /// [`check`] from the key [`Trust::key_for`] picks.
    pub fn check(&self, receipt: Option<&wire::Receipt>) -> Result<CheckedReceipt, ReceiptError> {
        let r = receipt.ok_or(ReceiptError::Missing)?;
        check(Some(r), &self.key_for(r)?)
    }

    /// [`check_grant`] from the key [`Trust::key_for`] picks.
    pub fn check_grant(
        &self,
        receipt: Option<&wire::Receipt>,
        fingerprint: &str,
    ) -> Result<CheckedReceipt, ReceiptError> {
        let r = receipt.ok_or(ReceiptError::Missing)?;
        check_grant(Some(r), &self.key_for(r)?, fingerprint)
    }
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
        wire::Receipt { signature: key.sign(&entry).to_vec(), entry, ..Default::default() }
    }

    fn denial() -> Event {
        Event::Denial {
            action: "grant".into(),
            node: "n".into(),
            kind: String::new(),
            role: String::new(),
            policy: String::new(),
            reason: "r".into(),
            caller: None,
        }
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
        let deny = denial();
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

    #[test]
    fn a_fleet_receipt_is_checked_with_a_key_the_fleet_key_endorsed() {
        let fleet = SignerKey::generate("grantline-fleet/example").unwrap();
        let (a, b) = (SignerKey::generate("a.example/log").unwrap(), SignerKey::generate("b.example/log").unwrap());
        let outsider = SignerKey::generate("evil.example/log").unwrap();
        let endorse = |by: &SignerKey, key: &SignerKey| {
            let vkey = key.verifier().to_string();
            (by.sign(&endorsement_message(&vkey)).to_vec(), vkey)
        };
        let event = denial();
        let trust = Trust { pinned: a.verifier().clone(), fleet: Some(fleet.verifier().clone()) };
        let mut from_b = signed(&b, 4, &event);
        (from_b.endorsement, from_b.endorsed_vkey) = endorse(&fleet, &b);
        assert_eq!(trust.check(Some(&from_b)).unwrap().key, *b.verifier());
        // The pinned broker's own receipts need no endorsement.
        assert_eq!(trust.check(Some(&signed(&a, 1, &event))).unwrap().key, *a.verifier());
        // A key outside the fleet: self-endorsed, endorsed by another key,
        // or an endorsement moved to another key.
        let mut self_endorsed = signed(&outsider, 4, &event);
        (self_endorsed.endorsement, self_endorsed.endorsed_vkey) = endorse(&outsider, &outsider);
        assert!(matches!(trust.check(Some(&self_endorsed)), Err(ReceiptError::NotInFleet(_))));
        let mut moved = signed(&outsider, 4, &event);
        moved.endorsement = from_b.endorsement.clone();
        moved.endorsed_vkey = outsider.verifier().to_string();
        assert!(matches!(trust.check(Some(&moved)), Err(ReceiptError::NotInFleet(_))));
        // An endorsed key does not vouch for entries another key signed.
        let mut borrowed = signed(&outsider, 4, &event);
        (borrowed.endorsement, borrowed.endorsed_vkey) = endorse(&fleet, &b);
        assert!(matches!(trust.check(Some(&borrowed)), Err(ReceiptError::BadSignature(_))));
        // An agent of a lone broker accepts no other log.
        let lone = Trust { pinned: a.verifier().clone(), fleet: None };
        assert!(matches!(lone.check(Some(&from_b)), Err(ReceiptError::NotInFleet(_))));
    }
}
