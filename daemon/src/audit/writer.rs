//! The single audit writer. Requests queue on a bounded channel; one thread
//! takes every request waiting, encodes, chains and signs them, and commits
//! them in one SQLite transaction (group commit). Only after the commit has
//! returned — the entries are durable — does any requester get its receipt.
//! If the commit fails, every requester in the batch gets an error and the
//! chain state is left as it was: no durable entry, no credential.

use std::path::Path;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use grantline_proto::audit::entry::leaf_hash;
use grantline_proto::audit::{Entry, Event, Hash, SignerKey, ZERO_HASH};
use grantline_proto::wire;
use tokio::sync::{mpsc, oneshot};

use super::store::{AuditStore, NewEntry};

/// How many appends may wait for the writer; beyond this, callers wait for room
/// (back-pressure) instead of growing a queue without bound.
const QUEUE: usize = 8192;
/// The most entries one transaction commits.
const MAX_BATCH: usize = 4096;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log cannot be written ({0}); nothing was issued, retry later")]
    Unavailable(String),
    #[error("the audit writer has stopped")]
    Stopped,
}

struct Append {
    event: Event,
    reply: oneshot::Sender<Result<wire::Receipt, AuditError>>,
}

/// A handle to the audit writer; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Append>,
}

impl AuditLog {
    /// Opens the log at `path` and starts the writer thread. A new log gets its
    /// genesis entry, naming `key`, before this returns.
    pub fn start(path: &Path, key: SignerKey, software: &str) -> Result<(Self, JoinHandle<()>)> {
        let mut store = AuditStore::open(path).with_context(|| format!("cannot open audit log {}", path.display()))?;
        let mut state = ChainState::resume(&store, &key)?;
        if state.next_seq == 0 {
            let genesis = Event::Genesis { vkey: key.verifier().to_string(), software: software.to_owned() };
            let entry = state.seal(&key, &genesis);
            store.append(std::slice::from_ref(&entry)).context("cannot write the audit log's genesis entry")?;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run(store, key, state, rx))
            .context("cannot start the audit writer thread")?;
        Ok((Self { tx }, handle))
    }

    /// Appends `event`; returns its signed receipt once the entry is durable.
    pub async fn append(&self, event: Event) -> Result<wire::Receipt, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Append { event, reply }).await.map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }
}

struct ChainState {
    origin: String,
    next_seq: u64,
    prev: Hash,
    last_time: i64,
}

impl ChainState {
    /// Picks up where the stored log ends, refusing a log signed by another key.
    fn resume(store: &AuditStore, key: &SignerKey) -> Result<Self> {
        let origin = key.verifier().name().to_owned();
        let Some(last) = store.last()? else {
            return Ok(Self { origin, next_seq: 0, prev: ZERO_HASH, last_time: 0 });
        };
        if let Some(first) = store.first()? {
            let entry = Entry::decode(&first.entry).context("the audit log's first entry is malformed")?;
            match entry.event() {
                Ok(Event::Genesis { vkey, .. }) if vkey == key.verifier().to_string() => {}
                Ok(Event::Genesis { vkey, .. }) => bail!(
                    "the audit log was started by key {vkey}, but the audit key file holds {}; use the key that started this log",
                    key.verifier()
                ),
                _ => bail!("the audit log's first entry is not a genesis entry; the log is damaged, run 'grantline audit verify'"),
            }
        }
        let entry = Entry::decode(&last.entry)
            .context("the audit log's last entry is malformed; run 'grantline audit verify'")?;
        let seq = u64::try_from(last.seq).unwrap_or(0);
        if entry.seq != seq || entry.origin != origin {
            bail!(
                "the audit log's last entry (seq {seq}) does not belong to log {origin}; run 'grantline audit verify'"
            );
        }
        Ok(Self { origin, next_seq: seq + 1, prev: leaf_hash(&last.entry), last_time: entry.time_ms })
    }

    /// Encodes and signs the next entry and moves the chain past it; the
    /// caller restores the previous state if the entry is not committed.
    fn seal(&mut self, key: &SignerKey, event: &Event) -> NewEntry {
        // Time never goes backwards in the log, even if the clock steps back.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let time = now.max(self.last_time);
        let entry = Entry::encode(&self.origin, self.next_seq, time, &self.prev, event);
        let hash = leaf_hash(&entry);
        let signature = key.sign(&entry);
        self.prev = hash;
        self.next_seq += 1;
        self.last_time = time;
        NewEntry { seq: self.next_seq - 1, hash, entry, signature }
    }
}

fn run(mut store: AuditStore, key: SignerKey, mut state: ChainState, mut rx: mpsc::Receiver<Append>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let saved = (state.next_seq, state.prev, state.last_time);
        let entries: Vec<NewEntry> = batch.iter().map(|a| state.seal(&key, &a.event)).collect();
        match store.append(&entries) {
            Ok(()) => {
                for (a, e) in batch.drain(..).zip(entries) {
                    let _ = a.reply.send(Ok(wire::Receipt { entry: e.entry, signature: e.signature.to_vec() }));
                }
            }
            Err(err) => {
                (state.next_seq, state.prev, state.last_time) = saved;
                tracing::error!(error = %err, batch = batch.len(), "audit commit failed; refusing the batch");
                let err = AuditError::Unavailable(err.to_string());
                for a in batch.drain(..) {
                    let _ = a.reply.send(Err(err.clone()));
                }
            }
        }
    }
    tracing::info!(next_seq = state.next_seq, "audit writer stopped");
}
