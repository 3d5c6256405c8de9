//! Vault/OpenBao as a source of credentials (RFD 0004): the connection and the
//! broker's own token (`client`), the issuer for every kind (`issuer`), the
//! intermediate CA obtained from Vault PKI (`intermediate`), and the raw
//! endpoints vaultrs lacks (`endpoints`).

mod client;
pub mod config;
mod endpoints;
mod failure;
mod intermediate;
mod issuer;

pub use client::{Minted, Vault};
pub use config::{VaultConfig, X509Mode};
pub use intermediate::Intermediate;
pub use issuer::VaultIssuer;
