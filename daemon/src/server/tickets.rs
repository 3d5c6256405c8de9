//! TLS session tickets that survive a broker restart (RFD 0008).
//!
//! A reconnecting agent that presents a ticket resumes its TLS session:
//! no certificate signature from the broker, no verification of the agent's
//! chain, on either side — the bulk of a handshake's cost, and what a
//! reconnect storm after a restart is made of. rustls seals tickets with
//! in-memory keys by default, which a restart throws away, so the broker
//! keeps its own: AES-256-GCM keys rolled every [`PERIOD`], the current and
//! the previous one kept (0600) in `tls-tickets.key` beside the node CA key,
//! older ones erased. TLS 1.3 resumption in rustls is always `psk_dhe_ke`: a
//! fresh key exchange still happens, so a stolen ticket key does not open
//! recorded traffic.
//!
//! A resumed session skips the agent's chain verification, so the identity
//! read from it is checked again ([`super::PeerNode::from_connection`]
//! refuses an expired certificate; revocation is checked on every
//! connection anyway).

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use anyhow::{bail, Context, Result};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use grantline_proto::files::{read_secret, write_secret};

/// How long one key seals new tickets; it opens them for one period more.
pub const PERIOD: u64 = 6 * 3600;

const TAG_LEN: usize = 16;

struct Key {
    epoch: u64,
    raw: [u8; 32],
    aead: LessSafeKey,
}

impl Key {
    fn new(epoch: u64, raw: [u8; 32]) -> Self {
        // 32 bytes is AES-256's key length: this cannot fail.
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).expect("a 32-byte AES-256 key"));
        Self { epoch, raw, aead }
    }

    fn random(epoch: u64) -> Self {
        Self::new(epoch, rand::random())
    }
}

/// The current key and, for tickets sealed shortly before it, the previous.
struct Keys {
    current: Key,
    previous: Option<Key>,
}

impl Keys {
    /// Rolls to `epoch`: a fresh current key, the current one kept as
    /// previous only if it belongs to the period just before; anything
    /// older is dropped (and with the file rewritten, erased). False when
    /// the keys are already at `epoch` (or the clock went back).
    fn roll_to(&mut self, epoch: u64) -> bool {
        if self.current.epoch >= epoch {
            return false;
        }
        let old = std::mem::replace(&mut self.current, Key::random(epoch));
        self.previous = (old.epoch + 1 == epoch).then_some(old);
        true
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        for k in std::iter::once(&self.current).chain(self.previous.as_ref()) {
            out.push_str(&format!("{} {}\n", k.epoch, hex::encode(k.raw)));
        }
        out
    }

    fn decode(text: &str) -> Result<Self> {
        let mut keys = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (epoch, raw) = line.trim().split_once(' ').context("a line is not \"EPOCH HEXKEY\"")?;
            let epoch: u64 = epoch.parse().context("an epoch is not a number")?;
            let raw: [u8; 32] =
                hex::decode(raw).ok().and_then(|r| r.try_into().ok()).context("a key is not 32 hex-encoded bytes")?;
            keys.push(Key::new(epoch, raw));
        }
        let mut keys = keys.into_iter();
        let Some(current) = keys.next() else { bail!("it holds no key") };
        let previous = keys.next().filter(|p| p.epoch + 1 == current.epoch);
        if keys.next().is_some() {
            bail!("it holds more than two keys");
        }
        Ok(Self { current, previous })
    }

    /// `epoch ‖ nonce ‖ AES-256-GCM(plain)`, the epoch authenticated.
    fn seal(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let key = &self.current;
        let nonce: [u8; NONCE_LEN] = rand::random();
        let epoch = key.epoch.to_be_bytes();
        let mut sealed = plain.to_vec();
        key.aead.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(epoch), &mut sealed).ok()?;
        let mut out = Vec::with_capacity(8 + NONCE_LEN + sealed.len());
        out.extend_from_slice(&epoch);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    /// The plaintext of a ticket sealed by one of these keys; None for
    /// anything else (the input is the client's to choose).
    fn open(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < 8 + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (epoch, rest) = ticket.split_at(8);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let epoch_n = u64::from_be_bytes(epoch.try_into().ok()?);
        let key = std::iter::once(&self.current).chain(self.previous.as_ref()).find(|k| k.epoch == epoch_n)?;
        let mut buf = sealed.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = key.aead.open_in_place(nonce, Aad::from(epoch), &mut buf).ok()?;
        Some(plain.to_vec())
    }
}

/// The broker's ticket keys, rolled as time passes and saved at each roll.
pub struct TicketKeys {
    keys: RwLock<Keys>,
    path: PathBuf,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys").field("path", &self.path).finish_non_exhaustive()
    }
}

fn epoch_now() -> u64 {
    u64::try_from(grantline_proto::clock::now_unix()).unwrap_or(0) / PERIOD
}

impl TicketKeys {
    /// Loads `tls-tickets.key` from the state directory (creating it),
    /// rolled to the current period.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("tls-tickets.key");
        let epoch = epoch_now();
        let keys = if path.exists() {
            let text = read_secret(&path)?;
            let mut keys = Keys::decode(&text)
                .with_context(|| format!("{} is not valid; delete it to start afresh", path.display()))?;
            keys.roll_to(epoch);
            keys
        } else {
            Keys { current: Key::random(epoch), previous: None }
        };
        write_secret(&path, keys.encode().as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self { keys: RwLock::new(keys), path })
    }

    /// Rolls the keys if a period has passed since; saves them when it does.
    fn roll(&self) {
        let epoch = epoch_now();
        if self.keys.read().map_or(true, |k| k.current.epoch >= epoch) {
            return;
        }
        let mut keys = self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !keys.roll_to(epoch) {
            return;
        }
        if let Err(e) = write_secret(&self.path, keys.encode().as_bytes()) {
            // Resumption is an optimisation: a key that is not saved only
            // means a full handshake for each agent after a restart.
            tracing::warn!(path = %self.path.display(), error = %e, "cannot save the rolled TLS ticket keys");
        }
    }
}

impl rustls::server::ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    #[allow(clippy::cast_possible_truncation)]
    fn lifetime(&self) -> u32 {
        PERIOD as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.roll();
        self.keys.read().ok()?.seal(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.roll();
        let plain = self.keys.read().ok()?.open(cipher);
        if plain.is_some() {
            metrics::counter!("grantline_tls_resumptions_total").increment(1);
        }
        plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn tickets_open_under_their_key_and_the_next_period_only() {
        let mut keys = Keys { current: Key::random(10), previous: None };
        let t = keys.seal(b"session").unwrap();
        assert_eq!(keys.open(&t).unwrap(), b"session");
        // Every bit matters: epoch, nonce, ciphertext, tag.
        for i in 0..t.len() {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert!(keys.open(&bad).is_none(), "flipped byte {i} still opened");
        }
        for n in 0..8 + NONCE_LEN + TAG_LEN {
            assert!(keys.open(&t[..n]).is_none());
        }
        assert!(keys.roll_to(11));
        assert_eq!(keys.open(&t).unwrap(), b"session", "a ticket of the previous period");
        let t11 = keys.seal(b"later").unwrap();
        assert!(keys.roll_to(12));
        assert!(keys.open(&t).is_none(), "two periods on, the key is gone");
        assert_eq!(keys.open(&t11).unwrap(), b"later");
        assert!(keys.roll_to(20));
        assert!(keys.previous.is_none(), "after a gap nothing old is kept");
        assert!(keys.open(&t11).is_none());
        assert!(!keys.roll_to(20), "already at the period");
        assert!(!keys.roll_to(19), "the clock went back");
        assert_eq!(keys.current.epoch, 20);
    }

    #[test]
    fn the_file_round_trips_and_bad_files_are_explained() {
        let mut keys = Keys { current: Key::random(5), previous: None };
        keys.roll_to(6);
        let t = keys.seal(b"x").unwrap();
        let back = Keys::decode(&keys.encode()).unwrap();
        assert_eq!(back.open(&t).unwrap(), b"x");
        assert_eq!(back.previous.as_ref().map(|k| k.epoch), Some(5));
        for (text, want) in [
            ("", "no key"),
            ("5", "EPOCH HEXKEY"),
            ("x 00", "not a number"),
            ("5 abcd", "32 hex"),
            (&format!("7 {k}\n6 {k}\n5 {k}\n", k = "00".repeat(32)), "more than two"),
        ] {
            let e = Keys::decode(text).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn keys_survive_a_restart_through_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let a = TicketKeys::open(dir.path()).unwrap();
        let t = a.encrypt(b"resume me").unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("tls-tickets.key")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let b = TicketKeys::open(dir.path()).unwrap();
        assert_eq!(b.decrypt(&t).unwrap(), b"resume me");
        std::fs::write(dir.path().join("tls-tickets.key"), "junk").unwrap();
        let e = format!("{:#}", TicketKeys::open(dir.path()).unwrap_err());
        assert!(e.contains("tls-tickets.key"), "{e}");
    }
}
