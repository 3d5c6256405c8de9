//! C2SP signed notes (c2sp.org/signed-note, Go's `golang.org/x/mod/sumdb/note`):
//! a UTF-8 text ending in a newline, a blank line, then signature lines
//! `— <key name> <base64(key id || signature)>`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use super::key::{SignerKey, VerifierKey};

/// The most signature lines a note may carry (as Go's note package).
const MAX_SIGNATURES: usize = 100;
const DASH: &str = "\u{2014} ";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("malformed note: {0}")]
    Malformed(String),
    #[error("note signature by {name} (key {id:08x}) does not verify")]
    BadSignature { name: String, id: u32 },
    #[error("note carries no signature by a known key (signed by: {0})")]
    NoKnownSignature(String),
}

/// Signs `body` (which must end in a newline) as a note with `key`.
pub fn sign(body: &str, key: &SignerKey) -> Result<String, NoteError> {
    check_text(body)?;
    let mut sig = key.verifier().id().to_be_bytes().to_vec();
    sig.extend_from_slice(&key.sign(body.as_bytes()));
    Ok(format!("{body}\n{DASH}{} {}\n", key.verifier().name(), B64.encode(sig)))
}

/// A note whose signature by one of the given keys verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened<'a> {
    pub body: &'a str,
    /// The verified signers, by key name.
    pub signers: Vec<String>,
}

/// Opens a note: checks its form and every signature by a known key.
/// Signatures by unknown keys are ignored; a bad signature by a known key, or
/// no signature by any known key, is an error.
pub fn open<'a>(text: &'a str, keys: &[VerifierKey]) -> Result<Opened<'a>, NoteError> {
    let bad = |m: &str| NoteError::Malformed(m.into());
    let split = text.rfind("\n\n").ok_or_else(|| bad("no blank line before the signatures"))?;
    let (body, sigs) = (&text[..=split], &text[split + 2..]);
    check_text(body)?;
    if sigs.is_empty() || !sigs.ends_with('\n') {
        return Err(bad("the signature block does not end in a newline"));
    }
    let mut signers = Vec::new();
    let mut seen = Vec::new();
    for (n, line) in sigs[..sigs.len() - 1].split('\n').enumerate() {
        if n >= MAX_SIGNATURES {
            return Err(bad("too many signatures"));
        }
        let rest = line
            .strip_prefix(DASH)
            .ok_or_else(|| bad("a signature line does not start with an em dash and a space"))?;
        let (name, b64) = rest.split_once(' ').ok_or_else(|| bad("a signature line has no signature"))?;
        super::key::check_name(name).map_err(|e| NoteError::Malformed(e.to_string()))?;
        let raw = B64.decode(b64).map_err(|_| bad("a signature is not base64"))?;
        if raw.len() < 5 {
            return Err(bad("a signature is too short"));
        }
        let id = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        if seen.contains(&(name, id)) {
            return Err(bad("two signatures by the same key"));
        }
        seen.push((name, id));
        if let Some(key) = keys.iter().find(|k| k.name() == name && k.id() == id) {
            if !key.verify(body.as_bytes(), &raw[4..]) {
                return Err(NoteError::BadSignature { name: name.into(), id });
            }
            signers.push(name.to_owned());
        }
    }
    if signers.is_empty() {
        let names: Vec<String> = seen.iter().map(|(n, id)| format!("{n}+{id:08x}")).collect();
        return Err(NoteError::NoKnownSignature(names.join(", ")));
    }
    Ok(Opened { body, signers })
}

/// The text of a note without checking any signature: for a reader that
/// only passes the note on (verifiers open it with [`open`]).
pub fn body(text: &str) -> Option<&str> {
    text.rfind("\n\n").map(|i| &text[..=i])
}

fn check_text(body: &str) -> Result<(), NoteError> {
    if body.is_empty() || !body.ends_with('\n') {
        return Err(NoteError::Malformed("the note text does not end in a newline".into()));
    }
    if body.chars().any(|c| (c.is_control() && c != '\n') || c == '\u{FFFD}') {
        return Err(NoteError::Malformed("the note text has a control character".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SKEY: &str = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const BODY: &str =
        "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";

    /// Go's note package test vector (ed25519 signatures are deterministic).
    #[test]
    fn matches_the_go_vector() {
        let key = SignerKey::parse(SKEY).unwrap();
        let note = sign(BODY, &key).unwrap();
        assert_eq!(
            note,
            format!("{BODY}\n\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n")
        );
        let opened = open(&note, &[key.verifier().clone()]).unwrap();
        assert_eq!(opened.body, BODY);
        assert_eq!(opened.signers, vec!["PeterNeumann".to_owned()]);
    }

    #[test]
    fn rejects_what_it_should() {
        let key = SignerKey::parse(SKEY).unwrap();
        let other = SignerKey::generate("Other").unwrap();
        let note = sign(BODY, &key).unwrap();
        let keys = [key.verifier().clone()];
        let edited = note.replace("cryptography", "cryptographY");
        assert!(matches!(open(&edited, &keys), Err(NoteError::BadSignature { .. })));
        assert!(matches!(open(&note, &[other.verifier().clone()]), Err(NoteError::NoKnownSignature(_))));
        assert!(matches!(open(BODY, &keys), Err(NoteError::Malformed(_))));
        assert!(matches!(open(&note.replace('\u{2014}', "-"), &keys), Err(NoteError::Malformed(_))));
        assert!(matches!(open(&note[..note.len() - 1], &keys), Err(NoteError::Malformed(_))));
        assert!(sign("no newline", &key).is_err());
        assert!(sign("bell\u{7}\n", &key).is_err());
        // A second, unknown signature is fine; a duplicate is not.
        let cosigned = format!("{note}{}", sign(BODY, &other).unwrap().rsplit_once("\n\n").unwrap().1);
        assert_eq!(open(&cosigned, &keys).unwrap().signers, vec!["PeterNeumann".to_owned()]);
        let twice = format!("{note}{}", note.rsplit_once("\n\n").unwrap().1);
        assert!(matches!(open(&twice, &keys), Err(NoteError::Malformed(_))));
    }
}
