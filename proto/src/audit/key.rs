//! Audit signing keys in the C2SP signed-note formats.
//!
//! Verifier key: `<name>+<key id, 8 hex>+<base64(0x01 || ed25519 public key)>`.
//! Signer key:   `PRIVATE+KEY+<name>+<key id>+<base64(0x01 || ed25519 seed)>`,
//! the form Go's `golang.org/x/mod/sumdb/note` reads. The key id is the first
//! four bytes of SHA-256(name || "\n" || 0x01 || public key).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

const ALG_ED25519: u8 = 0x01;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key name {0:?} is not usable: it must be non-empty and contain no '+' or white space")]
    BadName(String),
    #[error("key name of {0} bytes is too long: a key name (the log's origin) has at most {MAX_NAME_LEN} bytes")]
    NameTooLong(usize),
    #[error("malformed key {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("key id {found:08x} does not match the key (expected {expected:08x}); the key string was altered")]
    KeyIdMismatch { found: u32, expected: u32 },
}

/// The longest key name (and so log origin) accepted.
pub const MAX_NAME_LEN: usize = 255;

/// Checks a signed-note key name (also the log's origin).
pub fn check_name(name: &str) -> Result<(), KeyError> {
    if name.len() > MAX_NAME_LEN {
        return Err(KeyError::NameTooLong(name.len()));
    }
    if name.is_empty() || name.contains('+') || name.chars().any(char::is_whitespace) {
        return Err(KeyError::BadName(name.to_owned()));
    }
    Ok(())
}

/// Checks a log origin: a usable key name that cannot be confused with the
/// first line of an audit entry.
pub fn check_origin(origin: &str) -> Result<(), KeyError> {
    check_name(origin)?;
    if origin.as_bytes() == &super::entry::MAGIC[..super::entry::MAGIC.len() - 1] {
        return Err(KeyError::BadName(origin.to_owned()));
    }
    Ok(())
}

/// The signed-note key id of an ed25519 key.
pub fn key_id(name: &str, public: &VerifyingKey) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(public.as_bytes());
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// A public audit key: what verifiers and agents hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl VerifierKey {
    pub fn new(name: &str, key: VerifyingKey) -> Result<Self, KeyError> {
        check_name(name)?;
        Ok(Self { name: name.to_owned(), id: key_id(name, &key), key })
    }

    /// Parses the C2SP verifier key string.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        let mut parts = s.splitn(3, '+');
        let (Some(name), Some(id_hex), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(KeyError::Malformed {
                what: "verifier key",
                reason: "expected <name>+<key id>+<base64 key>".into(),
            });
        };
        check_name(name)?;
        let found = parse_key_id(id_hex)?;
        let raw = decode_alg_key(b64, "verifier key")?;
        let key = VerifyingKey::from_bytes(&raw).map_err(|e| KeyError::Malformed {
            what: "verifier key",
            reason: format!("not an ed25519 public key: {e}"),
        })?;
        let this = Self::new(name, key)?;
        if this.id != found {
            return Err(KeyError::KeyIdMismatch { found, expected: this.id });
        }
        Ok(this)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn key(&self) -> &VerifyingKey {
        &self.key
    }

    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        let Ok(sig) = Signature::from_slice(sig) else {
            return false;
        };
        self.key.verify(msg, &sig).is_ok()
    }
}

impl std::fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut raw = [0u8; 33];
        raw[0] = ALG_ED25519;
        raw[1..].copy_from_slice(self.key.as_bytes());
        write!(f, "{}+{:08x}+{}", self.name, self.id, B64.encode(raw))
    }
}

/// A private audit key: held by the broker only, in a 0600 file.
///
/// Signs through aws-lc (the TLS stack's library): an ed25519 signature is
/// deterministic, so the bytes are ed25519-dalek's, at half its cost per
/// audit entry (RFD 0008 § The crypto bound per grant). dalek keeps the key
/// for its encodings and the verifier.
pub struct SignerKey {
    verifier: VerifierKey,
    key: SigningKey,
    signer: aws_lc_rs::signature::Ed25519KeyPair,
}

impl SignerKey {
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        let key = SigningKey::generate(&mut rand_core::OsRng);
        Self::from_signing_key(name, key)
    }

    pub fn from_signing_key(name: &str, key: SigningKey) -> Result<Self, KeyError> {
        let verifier = VerifierKey::new(name, key.verifying_key())?;
        let signer =
            aws_lc_rs::signature::Ed25519KeyPair::from_seed_and_public_key(key.as_bytes(), verifier.key.as_bytes())
                .map_err(|e| KeyError::Malformed { what: "signer key", reason: e.to_string() })?;
        Ok(Self { verifier, key, signer })
    }

    /// Parses `PRIVATE+KEY+<name>+<id>+<base64>`.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let rest = s.trim().strip_prefix("PRIVATE+KEY+").ok_or_else(|| KeyError::Malformed {
            what: "signer key",
            reason: "expected it to start with PRIVATE+KEY+".into(),
        })?;
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(id_hex), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(KeyError::Malformed {
                what: "signer key",
                reason: "expected PRIVATE+KEY+<name>+<key id>+<base64 seed>".into(),
            });
        };
        let found = parse_key_id(id_hex)?;
        let seed = decode_alg_key(b64, "signer key")?;
        let this = Self::from_signing_key(name, SigningKey::from_bytes(&seed))?;
        if this.verifier.id != found {
            return Err(KeyError::KeyIdMismatch { found, expected: this.verifier.id });
        }
        Ok(this)
    }

    /// The private key string. Write it only to a 0600 file.
    pub fn to_private_string(&self) -> String {
        let mut raw = [0u8; 33];
        raw[0] = ALG_ED25519;
        raw[1..].copy_from_slice(self.key.as_bytes());
        format!("PRIVATE+KEY+{}+{:08x}+{}", self.verifier.name, self.verifier.id, B64.encode(raw))
    }

    pub fn verifier(&self) -> &VerifierKey {
        &self.verifier
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        // aws-lc fails only when it cannot allocate; dalek then signs the
        // same bytes instead of the writer panicking.
        match self.signer.try_sign(msg) {
            Ok(sig) => {
                let mut out = [0u8; 64];
                out.copy_from_slice(sig.as_ref());
                out
            }
            Err(_) => self.key.sign(msg).to_bytes(),
        }
    }
}

impl std::fmt::Debug for SignerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignerKey({})", self.verifier)
    }
}

fn parse_key_id(s: &str) -> Result<u32, KeyError> {
    if s.len() != 8 {
        return Err(KeyError::Malformed { what: "key id", reason: format!("{s:?} is not 8 hex digits") });
    }
    u32::from_str_radix(s, 16).map_err(|_| KeyError::Malformed { what: "key id", reason: format!("{s:?} is not hex") })
}

fn decode_alg_key(b64: &str, what: &'static str) -> Result<[u8; 32], KeyError> {
    let raw = B64.decode(b64).map_err(|e| KeyError::Malformed { what, reason: format!("bad base64: {e}") })?;
    match raw.split_first() {
        Some((&ALG_ED25519, rest)) if rest.len() == 32 => {
            let mut out = [0u8; 32];
            out.copy_from_slice(rest);
            Ok(out)
        }
        Some((&ALG_ED25519, rest)) => {
            Err(KeyError::Malformed { what, reason: format!("ed25519 key is {} bytes, expected 32", rest.len()) })
        }
        Some((alg, _)) => {
            Err(KeyError::Malformed { what, reason: format!("algorithm byte {alg:#04x} is not ed25519 (0x01)") })
        }
        None => Err(KeyError::Malformed { what, reason: "empty key".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_tampering() {
        let k = SignerKey::generate("grantline.test/log").unwrap();
        let again = SignerKey::parse(&k.to_private_string()).unwrap();
        assert_eq!(again.verifier(), k.verifier());
        let v = VerifierKey::parse(&k.verifier().to_string()).unwrap();
        assert_eq!(&v, k.verifier());
        let sig = k.sign(b"hello");
        assert!(v.verify(b"hello", &sig));
        assert!(!v.verify(b"hellO", &sig));
        assert!(!v.verify(b"hello", &sig[..63]));

        let s = k.verifier().to_string();
        let renamed = s.replacen("grantline.test/log", "grantline.test/other", 1);
        assert!(matches!(VerifierKey::parse(&renamed), Err(KeyError::KeyIdMismatch { .. })));
        assert!(matches!(VerifierKey::parse("nonsense"), Err(KeyError::Malformed { .. })));
        assert!(matches!(SignerKey::generate("has space"), Err(KeyError::BadName(_))));
    }

    /// The signatures are ed25519-dalek's to the byte (ed25519 is
    /// deterministic), so the log's bytes do not depend on the library.
    #[test]
    fn signs_as_dalek_does() {
        for i in 0..32u8 {
            let k = SignerKey::generate("grantline.test/log").unwrap();
            let msg = vec![i; usize::from(i) * 37];
            assert_eq!(k.sign(&msg), k.key.sign(&msg).to_bytes());
            assert!(k.verifier().verify(&msg, &k.sign(&msg)));
        }
    }

    /// RFC 8032 § 7.1, test 1: the signer's bytes are ed25519's.
    #[test]
    fn signs_the_rfc_8032_vector() {
        let seed = hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60").unwrap();
        let k = SignerKey::from_signing_key("t", SigningKey::from_bytes(&seed.try_into().unwrap())).unwrap();
        assert_eq!(
            hex::encode(k.verifier().key().as_bytes()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        assert_eq!(
            hex::encode(k.sign(b"")),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
    }

    /// Test vector from the C2SP signed-note spec / Go's note package.
    #[test]
    fn matches_go_note_key_id() {
        let vkey = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
        let v = VerifierKey::parse(vkey).unwrap();
        assert_eq!(v.id(), 0xc74f20a3);
        assert_eq!(v.to_string(), vkey);
        let skey = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
        let s = SignerKey::parse(skey).unwrap();
        assert_eq!(s.verifier(), &v);
    }
}
