//! The broker's state directory: its lock, its key files (which must be
//! private), the audit key, and the policy file it reads.

use std::path::Path;

use anyhow::{Context, Result};
use grantline_proto::audit::{SignerKey, VerifierKey};
use grantline_proto::files::{read_secret, write_atomic, write_secret};

use crate::policy::Policy;

pub use grantline_audit::lock_state_dir;

/// The largest policy file read: thousands of rules.
pub const MAX_POLICY_FILE: u64 = 4 << 20;

/// The broker's private key files in its state directory.
pub const KEY_FILES: &[&str] = &[
    "audit.key",
    "ca.key",
    "node-ca.key",
    "x509-ca.key",
    "svid-ca.key",
    "jwt-svid.key",
    "server-ca.key",
    "fleet.key",
    "ssh-ca",
    "quic-reset.key",
    "tls-tickets.key",
    "join-token",
];

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

/// Creates the fleet key (`fleet.key`, `fleet.vkey`) in a fleet's root
/// directory: it endorses each broker's audit key when the broker joins.
pub fn create_fleet_key(root_dir: &Path, name: &str) -> Result<()> {
    let key = SignerKey::generate(name)?;
    write_secret(&root_dir.join("fleet.key"), key.to_private_string().as_bytes())?;
    write_atomic(&root_dir.join("fleet.vkey"), format!("{}\n", key.verifier()).as_bytes(), 0o644)?;
    Ok(())
}

/// Creates a joining broker's audit key under `origin` and has the fleet
/// key in `root_dir` endorse it (`audit.endorsement`: the key, then the
/// signature in base64), with the fleet's verifier key beside it.
pub fn endorse_audit_key(root_dir: &Path, state_dir: &Path, origin: &str) -> Result<()> {
    use base64::Engine;
    let fleet = SignerKey::parse(&read_secret(&root_dir.join("fleet.key"))?)
        .with_context(|| format!("{}/fleet.key is not a signed-note private key", root_dir.display()))?;
    anyhow::ensure!(!state_dir.join("audit.key").exists(), "{} already has an audit key", state_dir.display());
    let key = load_or_create_audit_key(state_dir, origin)?;
    let vkey = key.verifier().to_string();
    let signature = fleet.sign(&grantline_proto::audit::receipt::endorsement_message(&vkey));
    let text = format!("{vkey}\n{}\n", base64::engine::general_purpose::STANDARD.encode(signature));
    write_atomic(&state_dir.join("audit.endorsement"), text.as_bytes(), 0o644)?;
    // The node CA too: brokers trust another's node CA only with this, so
    // whoever writes the fleet's database cannot add a CA of their own.
    let node_ca = crate::pki::load_ca(state_dir, "node-ca")?
        .with_context(|| format!("{} has no node CA; run 'grantlined fleet join' first", state_dir.display()))?;
    let signature = fleet.sign(&node_ca_message(&node_ca.cert_der));
    let text = format!("{}\n", base64::engine::general_purpose::STANDARD.encode(signature));
    write_atomic(&state_dir.join("node-ca.endorsement"), text.as_bytes(), 0o644)?;
    write_atomic(&state_dir.join("fleet.vkey"), format!("{}\n", fleet.verifier()).as_bytes(), 0o644)?;
    Ok(())
}

/// What the fleet key signs to endorse a broker's node CA.
pub(crate) fn node_ca_message(der: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    format!("grantline fleet node ca v1\n{}\n", hex::encode(sha2::Sha256::digest(der))).into_bytes()
}

/// Whether `fleet` endorsed the node CA `der` with `endorsement` (base64).
pub(crate) fn node_ca_endorsed(fleet: &VerifierKey, der: &[u8], endorsement: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(endorsement.trim())
        .is_ok_and(|sig| fleet.verify(&node_ca_message(der), &sig))
}

/// This broker's node CA endorsement (base64), if it joined a fleet.
pub(crate) fn load_node_ca_endorsement(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("node-ca.endorsement");
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(
        grantline_proto::files::read_bounded(&path, grantline_proto::files::MAX_SECRET_FILE)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_owned(),
    ))
}

/// A fleet broker's endorsement and the fleet key, if it joined a fleet;
/// checked, so a broker never hands out receipts agents would refuse.
pub(crate) fn load_endorsement(dir: &Path) -> Result<Option<(grantline_audit::Endorsement, VerifierKey)>> {
    use base64::Engine;
    let path = dir.join("audit.endorsement");
    if !path.exists() {
        return Ok(None);
    }
    let bounded = |p: &Path| {
        grantline_proto::files::read_bounded(p, grantline_proto::files::MAX_SECRET_FILE)
            .with_context(|| format!("cannot read {}", p.display()))
    };
    let text = bounded(&path)?;
    let fleet = VerifierKey::parse(bounded(&dir.join("fleet.vkey"))?.trim())
        .with_context(|| format!("{}/fleet.vkey is not a verifier key", dir.display()))?;
    let mut lines = text.lines();
    let (Some(vkey), Some(sig)) = (lines.next(), lines.next()) else {
        anyhow::bail!("{} is not two lines (key, signature)", path.display());
    };
    let signature = base64::engine::general_purpose::STANDARD
        .decode(sig.trim())
        .with_context(|| format!("{}: the signature is not base64", path.display()))?;
    anyhow::ensure!(
        fleet.verify(&grantline_proto::audit::receipt::endorsement_message(vkey), &signature),
        "{} does not verify under the fleet key in fleet.vkey; run 'grantlined fleet join' again",
        path.display()
    );
    Ok(Some((grantline_audit::Endorsement { vkey: vkey.to_owned(), signature }, fleet)))
}

/// The log's keys, oldest first, ending with `current`: the history
/// `grantline audit rotate-key` keeps in `audit.vkeys` (lines of another
/// name, or that do not parse, are skipped), for recognising this log's
/// checkpoints signed before a rotation.
pub fn key_history(state_dir: &Path, current: &VerifierKey) -> Vec<VerifierKey> {
    let text = grantline_proto::files::read_bounded(&state_dir.join("audit.vkeys"), 1 << 20).unwrap_or_default();
    let mut keys: Vec<VerifierKey> = text
        .lines()
        .filter_map(|l| VerifierKey::parse(l.trim()).ok())
        .filter(|k| k.name() == current.name() && k != current)
        .collect();
    keys.push(current.clone());
    keys
}
