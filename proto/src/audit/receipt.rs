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
}

/// Verifies a receipt's signature and origin and decodes its event.
pub fn check(receipt: Option<&wire::Receipt>, key: &VerifierKey) -> Result<CheckedReceipt, ReceiptError> {
    let r = receipt.ok_or(ReceiptError::Missing)?;
    if !key.verify(&r.entry, &r.signature) {
        return Err(ReceiptError::BadSignature(key.to_string()));
    }
    let entry = Entry::decode(&r.entry)?;
    if entry.origin != key.name() {
        return Err(ReceiptError::WrongOrigin { found: entry.origin.into(), expected: key.name().into() });
    }
    Ok(CheckedReceipt { seq: entry.seq, event: entry.event()? })
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
