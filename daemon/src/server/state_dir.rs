//! The broker's state directory: its lock, its key files (which must be
//! private), the audit key, and the policy file it reads.

use std::path::Path;

use anyhow::{Context, Result};
use grantline_proto::audit::SignerKey;
use grantline_proto::files::{read_secret, write_atomic, write_secret};

use crate::policy::Policy;

pub use grantline_audit::lock_state_dir;

/// The largest policy file read: thousands of rules.
pub const MAX_POLICY_FILE: u64 = 4 << 20;

/// The broker's private key files in its state directory.
pub const KEY_FILES: &[&str] =
    &["audit.key", "ca.key", "node-ca.key", "x509-ca.key", "ssh-ca", "quic-reset.key", "tls-tickets.key", "join-token"];

/// Refuses to start when a key file in `dir` can be read by group or
/// others: a configuration error (exit 78), found before anything binds.
pub fn check_key_files(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for name in KEY_FILES {
        let path = dir.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "key file {} has mode {mode:04o}, readable by others; run 'chmod 600 {}' (and consider the key exposed)",
                path.display(),
                path.display()
            );
        }
    }
    Ok(())
}

pub fn load_policy(path: &Path) -> Result<Policy> {
    let text = grantline_proto::files::read_bounded(path, MAX_POLICY_FILE)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    Policy::parse(&text).with_context(|| format!("policy file {} is invalid", path.display()))
}

pub(crate) fn load_or_create_audit_key(dir: &Path, origin: &str) -> Result<SignerKey> {
    let path = dir.join("audit.key");
    let key = if path.exists() {
        SignerKey::parse(&read_secret(&path)?)
            .with_context(|| format!("{} is not a signed-note private key", path.display()))?
    } else {
        grantline_proto::audit::key::check_origin(origin)?;
        let key = SignerKey::generate(origin)?;
        write_secret(&path, key.to_private_string().as_bytes())?;
        key
    };
    write_atomic(&dir.join("audit.vkey"), format!("{}\n", key.verifier()).as_bytes(), 0o644)?;
    Ok(key)
}
