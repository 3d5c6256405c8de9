//! Join tokens as both stores make and check them: `glt1.<id>.<secret>`,
//! of which only the SHA-256 of the secret is stored.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use grantline_proto::clock::rfc3339;
use sha2::{Digest, Sha256};

use super::store::TokenError;

/// A token about to be stored: what the admin gets, and what is kept.
pub(super) struct Minted {
    pub id: String,
    pub token: String,
    pub secret_hash: [u8; 32],
    pub expires_at: i64,
}

pub(super) fn mint(ttl: Duration, now: i64) -> Minted {
    let id = hex::encode(rand::random::<[u8; 8]>());
    let secret = B64URL.encode(rand::random::<[u8; 32]>());
    let expires_at = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
    Minted {
        token: format!("glt1.{id}.{secret}"),
        secret_hash: Sha256::digest(secret.as_bytes()).into(),
        id,
        expires_at,
    }
}

/// Splits a presented token into its id and secret, refusing anything
/// else before a store is asked.
pub(super) fn parse(token: &str) -> Result<(&str, &str), TokenError> {
    let mut parts = token.trim().split('.');
    let (Some("glt1"), Some(id), Some(secret), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed);
    };
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenError::Malformed);
    }
    Ok((id, secret))
}

/// A stored token's row, as both stores read it.
pub(super) struct Stored {
    pub secret_hash: Vec<u8>,
    pub used: bool,
    pub expires_at: i64,
}

/// Whether `secret` may spend the stored token `id` at `now`.
pub(super) fn check(id: &str, secret: &str, row: Option<Stored>, now: i64) -> Result<(), TokenError> {
    let Some(row) = row else {
        return Err(TokenError::Unknown(id.into()));
    };
    if row.secret_hash != Sha256::digest(secret.as_bytes()).as_slice() {
        // A wrong secret for a known id is reported as unknown: it tells a
        // guesser nothing.
        return Err(TokenError::Unknown(id.into()));
    }
    if row.used {
        return Err(TokenError::Used(id.into()));
    }
    if row.expires_at <= now {
        return Err(TokenError::Expired { id: id.into(), at: rfc3339(row.expires_at) });
    }
    Ok(())
}
