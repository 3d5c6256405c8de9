//! Fixture enrollment for load tests and fleet bootstrap (RFD 0008): many
//! node identities at once, for one shared key the caller holds, with the
//! broker stopped. Each node is recorded like an enrolled node and each
//! enrollment is audited (token id `fixture`), so the log stays complete and
//! verifies; only the interactive join-token exchange is skipped.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use grantline_proto::audit::Event;

use super::identity::{check_node_name, issue_identity};
use super::state_dir::{load_or_create_audit_key, lock_state_dir};
use crate::audit::AuditLog;
use crate::issuer::check_csr;
use crate::pki::Pki;
use crate::state::{NodeRecord, StateDb};

/// Issues identities for `names` certifying the key of `csr_der` (a PKCS#10
/// request the caller signed with the shared key); returns each node's leaf
/// certificate (DER), in order.
pub fn provision_nodes(state_dir: &Path, names: &[String], csr_der: &[u8], ttl: Duration) -> Result<Vec<Vec<u8>>> {
    let _lock = lock_state_dir(state_dir).context("stop grantlined before provisioning nodes")?;
    for n in names {
        check_node_name(n).map_err(anyhow::Error::msg)?;
    }
    let csr = check_csr(csr_der).map_err(anyhow::Error::msg)?;
    let pki = Pki::load_or_create(state_dir, &[])?;
    let now = grantline_proto::clock::now_unix();
    let mut leaves = Vec::with_capacity(names.len());
    let mut records = Vec::with_capacity(names.len());
    let mut events = Vec::with_capacity(names.len());
    for name in names {
        let id = issue_identity(&pki, name, &csr, ttl).map_err(anyhow::Error::msg)?;
        events.push(Event::Enrollment {
            node: name.clone(),
            labels: BTreeMap::from([("fixture".to_owned(), "true".to_owned())]),
            token_id: "fixture".into(),
            serial: id.serial.clone(),
            fingerprint: id.fingerprint,
            not_after: id.not_after,
        });
        records.push(NodeRecord {
            name: name.clone(),
            labels: BTreeMap::from([("fixture".to_owned(), "true".to_owned())]),
            serial: id.serial,
            previous_serial: String::new(),
            current_seen: true,
            not_after: id.not_after,
            revoked: false,
            revoked_at: 0,
            last_seen: 0,
            version: 0,
        });
        leaves.push(id.chain_der.into_iter().next().context("empty chain")?);
    }
    // Audited first, then recorded: a node is never enrolled without its entry.
    let key = load_or_create_audit_key(state_dir, &format!("grantline/{}", crate::config::hostname()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (log, writer) =
        AuditLog::start(&state_dir.join("audit.db"), key, concat!("grantlined ", env!("CARGO_PKG_VERSION")))?;
    runtime.block_on(async {
        let mut appends = tokio::task::JoinSet::new();
        for event in events {
            let log = log.clone();
            appends.spawn(async move { log.append(event).await });
        }
        while let Some(done) = appends.join_next().await {
            done.context("audit task failed")?.context("cannot audit a fixture enrollment")?;
        }
        anyhow::Ok(())
    })?;
    drop(log);
    writer.join().map_err(|_| anyhow::anyhow!("the audit writer panicked"))?;
    StateDb::open(&state_dir.join("state.db"))?.upsert_nodes(&records, now)?;
    Ok(leaves)
}
