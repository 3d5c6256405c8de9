//! The single audit writer. Requests queue on a bounded channel; one thread
//! takes every request waiting, encodes, chains and signs them, and commits
//! them in one SQLite transaction (group commit). Only after the commit has
//! returned — the entries are durable — does any requester get its receipt.
//! If the commit fails, every requester in the batch gets an error and the
//! chain state is left as it was: no durable entry, no credential.

use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use grantline_proto::audit::checkpoint::Checkpoint;
use grantline_proto::audit::entry::leaf_hash;
use grantline_proto::audit::merkle::Frontier;
use grantline_proto::audit::{Entry, Event, Hash, SignerKey, ZERO_HASH};
use grantline_proto::wire;
use tokio::sync::{mpsc, oneshot, watch};

use super::inventory::InventoryOp;
use super::store::{AuditStore, NewEntry, NewNode};

/// How many appends may wait for the writer; beyond this, callers wait for room
/// (back-pressure) instead of growing a queue without bound.
const QUEUE: usize = 8192;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log cannot be written ({0}); nothing was issued, retry later")]
    Unavailable(String),
    #[error("the audit writer has stopped")]
    Stopped,
    #[error("the event is too large to record ({0}); nothing was issued")]
    TooLarge(String),
}

struct Append {
    event: Event,
    reply: oneshot::Sender<Result<wire::Receipt, AuditError>>,
}

/// A fleet broker's audit key as the fleet key endorsed it (RFD 0010).
#[derive(Debug, Clone, Default)]
pub struct Endorsement {
    pub vkey: String,
    pub signature: Vec<u8>,
}

/// A handle to the audit writer; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Append>,
    checkpoints: watch::Receiver<Option<String>>,
    /// The number of durable entries (the next seq).
    size: watch::Receiver<u64>,
}

impl AuditLog {
    /// Opens the log at `path` and starts the writer thread. A new log gets its
    /// genesis entry, naming `key`, before this returns.
    pub fn start(path: &Path, key: SignerKey, software: &str) -> Result<(Self, JoinHandle<()>)> {
        Self::start_endorsed(path, key, software, None)
    }

    /// [`AuditLog::start`] for a broker of a fleet: every receipt carries
    /// `endorsement` (the log's first key and the fleet key's signature
    /// over it, RFD 0010) so agents enrolled elsewhere can check it.
    pub fn start_endorsed(
        path: &Path,
        key: SignerKey,
        software: &str,
        endorsement: Option<Endorsement>,
    ) -> Result<(Self, JoinHandle<()>)> {
        let mut store = AuditStore::open(path).with_context(|| format!("cannot open audit log {}", path.display()))?;
        let mut state = ChainState::resume(&mut store, &key)?;
        if state.next_seq == 0 {
            let genesis = Event::Genesis { vkey: key.verifier().to_string(), software: software.to_owned() };
            let (entry, nodes) = state.seal(&key, &genesis)?;
            store.append(std::slice::from_ref(&entry), &nodes).context("cannot write the audit log's genesis entry")?;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let latest = store.latest_checkpoint()?;
        let size = match &latest {
            Some(note) => {
                Checkpoint::open(note, key.verifier())
                    .context("the audit log's latest checkpoint does not verify")?
                    .size
            }
            None => 0,
        };
        let (published, checkpoints) = watch::channel(latest);
        let (grown, size_rx) = watch::channel(state.next_seq);
        // Rotation entries travel with every receipt, so agents that pinned
        // an older key can follow the chain to the current one.
        let mut rotations = Vec::new();
        for (seq, _) in store.key_chain()?.into_iter().filter(|(seq, _)| *seq > 0) {
            let row = store.entry_at(seq)?;
            rotations.push(wire::Receipt { entry: row.entry, signature: row.signature, ..Default::default() });
        }
        let endorsement = endorsement.unwrap_or_default();
        let template = wire::Receipt {
            rotations,
            endorsed_vkey: endorsement.vkey,
            endorsement: endorsement.signature,
            ..Default::default()
        };
        // The first checkpoint (or one covering entries added before the
        // last stop) is due at once.
        let at = Instant::now().checked_sub(CHECKPOINT_EVERY).unwrap_or_else(Instant::now);
        let checkpointer = Checkpointer { size, at, published };
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run(store, key, state, rx, checkpointer, template, grown))
            .context("cannot start the audit writer thread")?;
        Ok((Self { tx, checkpoints, size: size_rx }, handle))
    }

    /// The latest signed checkpoint note, updated as the writer signs more.
    pub fn checkpoints(&self) -> watch::Receiver<Option<String>> {
        self.checkpoints.clone()
    }

    /// The number of durable entries, updated after every commit.
    pub fn size(&self) -> watch::Receiver<u64> {
        self.size.clone()
    }

    /// Appends `event`; returns its signed receipt once the entry is durable.
    pub async fn append(&self, event: Event) -> Result<wire::Receipt, AuditError> {
        let started = Instant::now();
        // Cut to its bounds here, on the caller's task, so the writer thread
        // and the credential inventory see the event as it will be recorded.
        let event = event.bounded();
        let (reply, rx) = oneshot::channel();
        self.tx.send(Append { event, reply }).await.map_err(|_| AuditError::Stopped)?;
        let result = rx.await.map_err(|_| AuditError::Stopped)?;
        metrics::histogram!("grantline_audit_append_seconds").record(started.elapsed().as_secs_f64());
        if result.is_err() {
            metrics::counter!("grantline_audit_append_failures_total").increment(1);
        }
        result
    }
}

#[derive(Clone)]
pub(crate) struct ChainState {
    origin: String,
    next_seq: u64,
    prev: Hash,
    last_time: i64,
    /// The right edge of the Merkle tree over the committed entries.
    tree: Frontier,
}

impl ChainState {
    /// Picks up where the stored log ends, refusing a log signed by another key.
    pub(crate) fn resume(store: &mut AuditStore, key: &SignerKey) -> Result<Self> {
        let origin = key.verifier().name().to_owned();
        let Some(last) = store.last()? else {
            return Ok(Self { origin, next_seq: 0, prev: ZERO_HASH, last_time: 0, tree: Frontier::default() });
        };
        let chain = store.key_chain().context("cannot read the audit log's keys")?;
        let Some(current) = chain.last() else {
            bail!(
                "the audit log's first entry is not a genesis entry; the log is damaged, run 'grantline audit verify'"
            );
        };
        if current.1 != key.verifier().to_string() {
            bail!(
                "the audit log's current key is {}, but the audit key file holds {}; use the log's current key",
                current.1,
                key.verifier()
            );
        }
        let entry = Entry::decode(&last.entry)
            .context("the audit log's last entry is malformed; run 'grantline audit verify'")?;
        let seq = u64::try_from(last.seq).unwrap_or(0);
        if entry.seq != seq || entry.origin != origin {
            bail!(
                "the audit log's last entry (seq {seq}) does not belong to log {origin}; run 'grantline audit verify'"
            );
        }
        // The tree may lag the entries in a log written before it had one:
        // add the missing leaves from the stored entry hashes.
        let stored = store.tree_size()?;
        let mut tree = Frontier::load(&*store, stored).context("the audit log's Merkle tree is damaged")?;
        if stored < seq + 1 {
            let mut nodes = Vec::new();
            for hash in store.hashes_from(stored)? {
                nodes.extend(tree.push(hash));
            }
            store.append(&[], &nodes).context("cannot add the missing Merkle tree nodes")?;
            tracing::info!(from = stored, to = seq + 1, "Merkle tree brought up to date with the log");
        }
        Ok(Self { origin, next_seq: seq + 1, prev: leaf_hash(&last.entry), last_time: entry.time_ms, tree })
    }

    /// Encodes and signs the next entry and moves the chain and tree past it;
    /// returns the entry and the tree nodes it completes. The caller restores
    /// the previous state if they are not committed.
    fn seal(&mut self, key: &SignerKey, event: &Event) -> Result<(NewEntry, Vec<NewNode>), AuditError> {
        let (mut entry, nodes) = self.chain(event)?;
        entry.signature = key.sign(&entry.entry);
        Ok((entry, nodes))
    }

    /// [`Self::seal`] without the signature, which the caller adds (to sign a
    /// batch on every core; the chain itself needs only the entry hashes).
    /// The event is cut to its bounds; one that is still too large is refused
    /// and the chain is left as it was, so no entry the verifier would reject
    /// is ever written.
    fn chain(&mut self, event: &Event) -> Result<(NewEntry, Vec<NewNode>), AuditError> {
        // Time never goes backwards in the log, even if the clock steps back.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let time = now.max(self.last_time);
        // `append` bounded the event's fields; an entry still too large (many
        // long fields at once) is refused here, before the chain moves.
        let entry = Entry::encode(&self.origin, self.next_seq, time, &self.prev, event);
        if entry.len() > grantline_proto::audit::entry::MAX_ENTRY_LEN {
            return Err(AuditError::TooLarge(format!(
                "{} event: the entry would be {} bytes, over the {}-byte limit",
                event.type_name(),
                entry.len(),
                grantline_proto::audit::entry::MAX_ENTRY_LEN
            )));
        }
        let hash = leaf_hash(&entry);
        self.prev = hash;
        self.next_seq += 1;
        self.last_time = time;
        let nodes = self.tree.push(hash);
        Ok((NewEntry { seq: self.next_seq - 1, hash, entry, signature: [0; 64] }, nodes))
    }
}

/// Checkpoints are signed at most this often while the log grows, and at
/// least this often: a pending one is written when the interval has passed
/// even if no more entries arrive.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// How often expired rows leave the credential inventory.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

struct Checkpointer {
    size: u64,
    at: Instant,
    published: watch::Sender<Option<String>>,
}

impl Checkpointer {
    /// Signs and stores a checkpoint of the committed tree when it grew and
    /// the interval has passed (or always, when `force`).
    fn maybe(&mut self, store: &AuditStore, key: &SignerKey, state: &ChainState, force: bool) {
        let size = state.tree.size();
        if size == self.size || (!force && self.at.elapsed() < CHECKPOINT_EVERY) {
            return;
        }
        let cp = Checkpoint { origin: state.origin.clone(), size, root: state.tree.root() };
        let note = match cp.sign(key) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign a checkpoint");
                return;
            }
        };
        match store.add_checkpoint(size, state.last_time, &note) {
            Ok(()) => {
                self.size = size;
                self.at = Instant::now();
                self.published.send_replace(Some(note));
            }
            Err(e) => tracing::error!(error = %e, size, "cannot store a checkpoint; will retry"),
        }
    }

    /// How long the writer may wait for work before a checkpoint is due.
    fn wait(&self, state: &ChainState) -> Duration {
        if state.tree.size() == self.size {
            Duration::from_secs(3600)
        } else {
            CHECKPOINT_EVERY.saturating_sub(self.at.elapsed())
        }
    }
}

fn run(
    mut store: AuditStore,
    key: SignerKey,
    mut state: ChainState,
    mut rx: mpsc::Receiver<Append>,
    mut cp: Checkpointer,
    template: wire::Receipt,
    grown: watch::Sender<u64>,
) {
    // A small runtime of the writer's own, for receiving with a timeout.
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_time().build() else {
        tracing::error!("cannot start the audit writer's timer; the writer stops");
        return;
    };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // The last batch's size, and when the writer was last ready for more.
    let mut previous = 0;
    let mut ready = Instant::now();
    let mut pruned = Instant::now().checked_sub(PRUNE_EVERY).unwrap_or_else(Instant::now);
    loop {
        let wait = cp.wait(&state);
        let first = match rt.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
            Ok(Some(first)) => first,
            Ok(None) => break,
            Err(_) => {
                cp.maybe(&store, &key, &state, false);
                continue;
            }
        };
        batch.push(first);
        if let Some(window) = commit_window(previous, ready.elapsed(), rx.len()) {
            std::thread::sleep(window);
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let saved = state.clone();
        let mut entries = Vec::with_capacity(batch.len());
        let mut nodes = Vec::with_capacity(batch.len() * 2);
        let mut inventory = Vec::new();
        // An event that cannot be recorded is refused on its own; the rest
        // of the batch goes on.
        batch.retain_mut(|a| match state.chain(&a.event) {
            Ok((e, n)) => {
                inventory.extend(InventoryOp::of(e.seq, state.last_time, &a.event));
                entries.push(e);
                nodes.extend(n);
                true
            }
            Err(err) => {
                tracing::error!(error = %err, "an event was refused by the audit log");
                let (reply, _) = oneshot::channel();
                let _ = std::mem::replace(&mut a.reply, reply).send(Err(err));
                false
            }
        });
        previous = batch.len();
        if batch.is_empty() {
            ready = Instant::now();
            continue;
        }
        sign_all(&key, &mut entries);
        match store.append_with_inventory(&entries, &nodes, &inventory) {
            Ok(()) => {
                grown.send_replace(state.next_seq);
                for (a, e) in batch.drain(..).zip(entries) {
                    let receipt = wire::Receipt { entry: e.entry, signature: e.signature.to_vec(), ..template.clone() };
                    let _ = a.reply.send(Ok(receipt));
                }
                cp.maybe(&store, &key, &state, false);
                if pruned.elapsed() >= PRUNE_EVERY {
                    pruned = Instant::now();
                    if let Err(e) = store.prune_inventory(grantline_proto::clock::now_unix()) {
                        tracing::warn!(error = %e, "cannot prune the credential inventory");
                    }
                }
            }
            Err(err) => {
                state = saved;
                tracing::error!(error = %err, batch = batch.len(), "audit commit failed; refusing the batch");
                let err = AuditError::Unavailable(err.to_string());
                for a in batch.drain(..) {
                    let _ = a.reply.send(Err(err.clone()));
                }
            }
        }
        ready = Instant::now();
    }
    cp.maybe(&store, &key, &state, true);
    // The log is whole in audit.db once the writer stops, whoever closes
    // last (a reader closing after it never folds the WAL in).
    if let Err(e) = store.fold_wal() {
        tracing::warn!(error = %e, "cannot fold the audit WAL into audit.db; copy audit.db-wal with it");
    }
    tracing::info!(next_seq = state.next_seq, "audit writer stopped");
}

/// Rotates the log's signing key: appends a `key_rotation` entry, signed by
/// `old`, naming `new`, and a checkpoint signed by `new` that covers it. The
/// broker must not be running (its lock on the state directory says so).
/// Returns the rotation entry's seq.
pub fn rotate_key(path: &Path, old: &SignerKey, new: &SignerKey) -> Result<u64> {
    if old.verifier().name() != new.verifier().name() {
        bail!("the new key must have the log's name {:?}", old.verifier().name());
    }
    let mut store = AuditStore::open(path).with_context(|| format!("cannot open audit log {}", path.display()))?;
    let mut state = ChainState::resume(&mut store, old)?;
    if state.next_seq == 0 {
        bail!("the audit log is empty; start the broker once first");
    }
    let (entry, nodes) = state.seal(old, &Event::KeyRotation { new_vkey: new.verifier().to_string() })?;
    store.append(std::slice::from_ref(&entry), &nodes).context("cannot append the key rotation")?;
    let cp = Checkpoint { origin: state.origin.clone(), size: state.tree.size(), root: state.tree.root() };
    store.add_checkpoint(cp.size, state.last_time, &cp.sign(new)?).context("cannot store the checkpoint")?;
    Ok(entry.seq)
}

mod batch;
use batch::{commit_window, sign_all, MAX_BATCH};

#[cfg(test)]
mod tests;
