//! Credential sinks: credentials the agent obtains for itself and keeps
//! fresh in configured files (owner, group, mode, written atomically),
//! running a reload command after each renewal. Renewal is at half-life
//! ± 10 %; while the broker cannot be reached, the agent retries with
//! backoff and the files already written stay in place until they expire.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use grantline_proto::audit::Entry;
use grantline_proto::clock::now_unix as now;
use grantline_proto::files::stage_owned;
use grantline_proto::kind::Kind;
use grantline_proto::wire;
use rand::Rng;

use crate::config::Sink;
use crate::credentials;
use crate::renew::{backoff, renew_at, MIN_USEFUL_LIFETIME};
use crate::session::{announce, Agent};
use grantline_proto::clock::rfc3339;

/// Keeps every sink fresh; never returns.
pub(crate) async fn keep_all(agent: Arc<Agent>, sinks: Vec<Sink>) {
    for sink in sinks {
        tokio::spawn(keep(agent.clone(), sink));
    }
    std::future::pending::<()>().await;
}

/// What one grant produced for a sink.
struct Obtained {
    files: Vec<(PathBuf, Vec<u8>)>,
    /// When the agent received it, on the agent's clock.
    received: i64,
    /// How long it lives from its issue, on the broker's clock (see
    /// [`lifetime_of`]): renewal counts half of it from `received`.
    lifetime: i64,
    not_after: i64,
    lease_id: String,
}

async fn keep(agent: Arc<Agent>, sink: Sink) {
    let mut previous_lease = String::new();
    loop {
        let mut attempt = 0u32;
        let got = loop {
            match obtain(&agent, &sink).await {
                Ok(o) => break o,
                Err(e) => {
                    let retry_after = e
                        .downcast_ref::<wire::Error>()
                        .map_or(Duration::ZERO, |w| Duration::from_millis(u64::from(w.retry_after_ms)));
                    let wait =
                        backoff(attempt, Duration::from_secs(1), Duration::from_secs(60), rand::thread_rng().gen())
                            .max(retry_after.min(crate::connection::MAX_BROKER_WAIT));
                    tracing::warn!(sink = %sink.name, error = %format!("{e:#}"), retry_in = ?wait, "cannot renew a sink; the files in place stay until they expire");
                    tokio::time::sleep(wait).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        };
        let at = renew_at(
            got.received,
            got.received.saturating_add(got.lifetime),
            rand::thread_rng().gen::<f64>() * 2.0 - 1.0,
            now(),
        );
        if !write_until(&sink, &got, at).await {
            // Never put in place: give its lease back rather than leave it
            // to its TTL, and obtain a fresh one (no sooner than renewal
            // would have: a sink that cannot be written is not a loop).
            if !got.lease_id.is_empty() {
                if let Err(e) = agent.release(&got.lease_id).await {
                    tracing::warn!(sink = %sink.name, error = %e, "cannot release an unwritten lease; it ends at its TTL");
                }
            }
            continue;
        }
        announce(&format!("grantline-agent sink {} written, valid until {}", sink.name, rfc3339(got.not_after)));
        if let Some(cmd) = &sink.reload {
            reload(&sink.name, cmd).await;
        }
        if !previous_lease.is_empty() {
            if let Err(e) = agent.release(&previous_lease).await {
                tracing::warn!(sink = %sink.name, error = %e, "cannot release the replaced lease; it ends at its TTL");
            }
        }
        previous_lease = got.lease_id;
        let lifetime = got.lifetime;
        if lifetime < MIN_USEFUL_LIFETIME {
            tracing::warn!(sink = %sink.name, lifetime_s = lifetime, "the credential lives too short to be renewed reliably (under {MIN_USEFUL_LIFETIME} s); raise the sink's ttl or the policy's max_ttl");
        }
        tokio::time::sleep(Duration::from_secs(u64::try_from(at - now()).unwrap_or(0))).await;
    }
}

/// Writes the sink's files, retrying the same credential with backoff
/// (1 s doubling to 60 s) while it is not yet due for renewal at `due`;
/// whether they were written. A write failure (a full disk, a directory
/// where a file goes) never mints a new credential per retry.
async fn write_until(sink: &Sink, got: &Obtained, due: i64) -> bool {
    let mut attempt = 0u32;
    loop {
        let e = match write_files(sink, &got.files) {
            Ok(()) => return true,
            Err(e) => e,
        };
        let wait = backoff(attempt, Duration::from_secs(1), Duration::from_secs(60), rand::thread_rng().gen())
            .max(Duration::from_millis(500));
        let give_up = now().saturating_add(i64::try_from(wait.as_secs()).unwrap_or(i64::MAX)) >= due;
        tracing::error!(sink = %sink.name, error = %format!("{e:#}"), retry_in = ?wait, give_up, "cannot write a sink; the files in place are unchanged");
        announce(&format!("grantline-agent sink {} not written: {e:#}", sink.name));
        tokio::time::sleep(if give_up { Duration::from_secs(u64::try_from(due - now()).unwrap_or(0)) } else { wait })
            .await;
        if give_up {
            return false;
        }
        attempt = attempt.saturating_add(1);
    }
}

/// Writes every file of the sink, or (as far as the file system allows)
/// none: each is staged in full first, so a failure while writing leaves
/// the old set in place, a key never beside a certificate it does not match.
fn write_files(sink: &Sink, files: &[(PathBuf, Vec<u8>)]) -> Result<()> {
    let mut staged = Vec::with_capacity(files.len());
    for (path, bytes) in files {
        if !sink.writable_dir {
            check_dir(path, nix::unistd::geteuid().as_raw())
                .with_context(|| format!("sink {}: will not write {}", sink.name, path.display()))?;
        }
        let s = stage_owned(path, bytes, sink.mode, sink.uid, sink.gid)
            .with_context(|| format!("sink {}: cannot write {}", sink.name, path.display()))?;
        s.destination_is_free().with_context(|| format!("sink {}: cannot replace {}", sink.name, path.display()))?;
        staged.push((path, s));
    }
    for (path, s) in staged {
        s.commit().with_context(|| format!("sink {}: cannot replace {}", sink.name, path.display()))?;
    }
    Ok(())
}

/// Refuses a sink directory that anyone but the agent's own user (or root)
/// can write, or that sits below one: whoever can write a directory on the
/// way can swap the files the agent writes as root between renewals, plant
/// names to redirect them, or replace a directory on the path with a
/// symlink to another. Every directory from `/` down is checked, on the path
/// as written and as it resolves. A sink marked `writable_dir = true` skips
/// this.
fn check_dir(path: &std::path::Path, agent_uid: u32) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let absolute = std::path::absolute(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let resolved = std::fs::canonicalize(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    check_one_dir(&absolute, agent_uid, false)?;
    check_one_dir(&resolved, agent_uid, false)?;
    for d in absolute.ancestors().chain(resolved.ancestors()).skip(1) {
        check_one_dir(d, agent_uid, true)?;
    }
    Ok(())
}

/// Checks one directory; `above` for one on the way to the sink's own, where
/// a sticky world-writable directory (`/tmp`) is fine: nobody but an entry's
/// owner may rename or remove it there.
fn check_one_dir(dir: &std::path::Path, agent_uid: u32, above: bool) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // As written: a symlink on the path counts by its own owner (whoever
    // owns it may have made it), and its target is checked on the resolved path.
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("cannot inspect {}", dir.display()))?;
    let owner_ok = meta.uid() == 0 || meta.uid() == agent_uid;
    let mode = meta.mode() & 0o7777;
    let sticky = above && mode & 0o1000 != 0;
    let writable = !meta.file_type().is_symlink() && mode & 0o022 != 0 && !sticky;
    if !owner_ok || writable {
        bail!(
            "{} (owner uid {}, mode {mode:04o}) can be written by others than the agent's user, and a sink's \
             files lie below it: they could redirect or replace the credential files; make every directory on \
             the way owned by root and not group- or world-writable, or set `writable_dir = true` on the sink \
             to accept the risk",
            dir.display(),
            meta.uid()
        );
    }
    Ok(())
}

async fn reload(name: &str, cmd: &str) {
    let run = tokio::process::Command::new("/bin/sh").arg("-c").arg(cmd).kill_on_drop(true).output();
    match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Ok(out)) if out.status.success() => {
            tracing::info!(sink = %name, "reload command ran");
            announce(&format!("grantline-agent sink {name} reloaded"));
        }
        Ok(Ok(out)) => tracing::error!(
            sink = %name,
            status = %out.status,
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "reload command failed"
        ),
        Ok(Err(e)) => tracing::error!(sink = %name, error = %e, "cannot run the reload command"),
        Err(_) => tracing::error!(sink = %name, "reload command did not finish within 60 s"),
    }
}

fn ttl_seconds(sink: &Sink) -> u32 {
    sink.ttl.map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// A credential's lifetime on the broker's clock: from the audit entry that
/// recorded its grant (its receipt, already checked) to its not-after. The
/// agent's own clock then only counts that long from receipt, so an agent
/// whose clock is off from the broker's renews neither late nor early.
fn lifetime_of(gr: &wire::GrantResponse) -> i64 {
    let issued = gr.receipt.as_ref().and_then(|r| Entry::decode(&r.entry).ok()).map(|e| e.time_ms.div_euclid(1000));
    gr.not_after_unix.saturating_sub(issued.unwrap_or_else(now))
}

async fn obtain(agent: &Agent, sink: &Sink) -> Result<Obtained> {
    let base = wire::GrantRequest {
        role: sink.role.clone(),
        ttl_seconds: ttl_seconds(sink),
        caller: Some(crate::local::own_caller()),
        ..Default::default()
    };
    let path = |p: &Option<PathBuf>| p.clone().context("missing path");
    match sink.kind {
        Kind::X509 => {
            let sans = if sink.sans.is_empty() { vec![agent.node_name().to_owned()] } else { sink.sans.clone() };
            let (key, csr) = credentials::x509_key_and_csr(&sans)?;
            let g = wire::GrantRequest { kind: Kind::X509.wire() as i32, csr_der: csr, sans, ..base };
            let gr = agent.grant(g).await?;
            let lifetime = lifetime_of(&gr);
            credentials::check_x509(&gr, &key)?;
            let mut files = vec![
                (path(&sink.key)?, key.serialize_pem().into_bytes()),
                (path(&sink.cert)?, gr.cert_pem.into_bytes()),
            ];
            if let Some(ca) = &sink.ca {
                files.push((ca.clone(), gr.chain_pem.into_bytes()));
            }
            Ok(Obtained { files, received: now(), lifetime, not_after: gr.not_after_unix, lease_id: String::new() })
        }
        kind @ (Kind::SshUser | Kind::SshHost) => {
            let (key, public) = credentials::ssh_key()?;
            let g = wire::GrantRequest {
                kind: kind.wire() as i32,
                ssh_public_key: public,
                principals: sink.principals.clone(),
                ..base
            };
            let gr = agent.grant(g).await?;
            let lifetime = lifetime_of(&gr);
            credentials::check_ssh(&gr, &key)?;
            let files = vec![
                (path(&sink.key)?, credentials::ssh_key_file(&key)?),
                (path(&sink.cert)?, credentials::ssh_cert_file(&gr)),
            ];
            Ok(Obtained { files, received: now(), lifetime, not_after: gr.not_after_unix, lease_id: String::new() })
        }
        Kind::VaultToken => {
            let g = wire::GrantRequest {
                kind: Kind::VaultToken.wire() as i32,
                vault_policies: sink.vault_policies.clone(),
                ..base
            };
            let gr = agent.grant(g).await?;
            let lifetime = lifetime_of(&gr);
            let files = vec![(path(&sink.token)?, format!("{}\n", gr.vault_token).into_bytes())];
            Ok(Obtained { files, received: now(), lifetime, not_after: gr.not_after_unix, lease_id: String::new() })
        }
        Kind::DynamicSecret => {
            let g = wire::GrantRequest { kind: Kind::DynamicSecret.wire() as i32, ..base };
            let gr = agent.grant(g).await?;
            let lifetime = lifetime_of(&gr);
            let files = vec![(path(&sink.secret)?, gr.secret_json.into_bytes())];
            Ok(Obtained { files, received: now(), lifetime, not_after: gr.not_after_unix, lease_id: gr.lease_id })
        }
        // SPIFFE SVIDs as files (RFD 0011), in the PEM forms spiffe-helper writes.
        Kind::X509Svid => {
            let caller = base.caller.clone().unwrap_or_else(crate::local::own_caller);
            let svid = crate::svid::obtain_x509(agent, &sink.role, base.ttl_seconds, &caller).await?;
            let mut files = vec![
                (path(&sink.key)?, svid.key_pem.clone().into_bytes()),
                (path(&sink.cert)?, svid.chain_pem.clone().into_bytes()),
            ];
            if let Some(ca) = &sink.ca {
                files.push((ca.clone(), svid.bundle_pem.clone().into_bytes()));
            }
            let lifetime = svid.not_after - now();
            Ok(Obtained { files, received: now(), lifetime, not_after: svid.not_after, lease_id: String::new() })
        }
        Kind::JwtSvid => {
            let g = wire::GrantRequest { kind: Kind::JwtSvid.wire() as i32, audience: sink.audiences.clone(), ..base };
            let gr = agent.grant(g).await?;
            crate::svid::check_receipt_names(&gr)?;
            let lifetime = lifetime_of(&gr);
            let mut files = vec![(path(&sink.token)?, format!("{}\n", gr.jwt_svid).into_bytes())];
            if let Some(ca) = &sink.ca {
                files.push((ca.clone(), gr.jwt_bundle_json.into_bytes()));
            }
            Ok(Obtained { files, received: now(), lifetime, not_after: gr.not_after_unix, lease_id: String::new() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grantline_proto::audit::Event;

    /// An agent whose clock is behind the broker's renewed late (the
    /// credential could expire on disk first); one ahead, early. The
    /// lifetime now comes from the broker's own clock: the receipt's entry.
    #[test]
    fn the_lifetime_is_read_on_the_broker_s_clock() {
        let issued_ms = 1_000_000_000;
        let event = Event::LeaseRevocation { node: "n".into(), lease: "l".into(), reason: String::new() };
        let entry = Entry::encode("t.example/log", 4, issued_ms, &[0; 32], &event);
        let gr = wire::GrantResponse {
            not_after_unix: 1_000_000 + 600,
            receipt: Some(wire::Receipt { entry, ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(lifetime_of(&gr), 600, "whatever the agent's clock says");
        let without = wire::GrantResponse { not_after_unix: now() + 60, ..Default::default() };
        assert!((59..=60).contains(&lifetime_of(&without)));
    }
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sink_directories_others_can_write_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let file = dir.path().join("key.pem");
        check_dir(&file, me).unwrap();
        for mode in [0o770, 0o777, 0o1777, 0o722] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let err = format!("{:#}", check_dir(&file, me).unwrap_err());
            assert!(err.contains("writable_dir = true"), "{mode:o}: {err}");
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        check_dir(&file, me).unwrap();
        // A directory on the way that others can write: refused too (the
        // review's swap of a parent directory for a symlink).
        let inner = dir.path().join("tls");
        std::fs::create_dir(&inner).unwrap();
        check_dir(&inner.join("key.pem"), me).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = format!("{:#}", check_dir(&inner.join("key.pem"), me).unwrap_err());
        assert!(err.contains("on the way"), "{err}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // A symlinked directory resolving into a writable one: refused.
        let open = tempfile::tempdir().unwrap();
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(open.path(), &link).unwrap();
        assert!(check_dir(&link.join("key.pem"), me).is_err());
        // Owned by a user who is neither root nor the agent: refused.
        if me == 0 {
            nix::unistd::chown(dir.path(), Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            assert!(check_dir(&file, me).is_err());
        }
    }
}
