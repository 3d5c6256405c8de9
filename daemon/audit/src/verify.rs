//! `grantline audit verify`: reads an audit database and checks it with the
//! pure verifier in `grantline_proto::audit::verify`, then checks every
//! checkpoint — those stored in the database and those given from outside
//! (an anchor, a copy kept by a security team) — against the entries.

use std::path::Path;

use anyhow::{Context, Result};
use grantline_proto::audit::checkpoint::Checkpoint;
use grantline_proto::audit::{ChainVerifier, Failure, Summary, VerifierKey};

use grantline_proto::audit::entry::leaf_hash;
use grantline_proto::audit::merkle::MemoryTree;
use grantline_proto::audit::{tiles, StoredEntry};

use crate::anchor::Anchor;
use crate::AuditStore;

/// Stored checkpoints read from the database at a time.
const CHECKPOINT_PAGE: usize = 1024;

/// Verifies the log in `db` under the `trusted` keys (one of them must have
/// started it), and the signed checkpoints in it and in `external`, each of
/// which must be signed by a key the log reached from its trusted genesis.
/// The outer error is "could not read"; the inner result is the verdict.
///
/// Stored checkpoints are checked in step with the walk over the entries, a
/// page at a time: each when the tree reaches its size, against the root
/// and the keys at that point. So memory stays bounded whatever the number
/// of checkpoints (a broker signs one every few seconds, for years).
pub fn verify_db(
    db: &Path,
    trusted: &[VerifierKey],
    progress: bool,
    external: &[String],
) -> Result<Result<Summary, Failure>> {
    if !db.exists() {
        anyhow::bail!("audit database {} does not exist", db.display());
    }
    let store =
        AuditStore::open_untrusted(db).with_context(|| format!("cannot open audit database {}", db.display()))?;
    let total = store.count().with_context(|| format!("{} is not a Grantline audit database", db.display()))?;
    // Given checkpoints are few: read first for their sizes (so the walk
    // records the roots to compare) and their signatures checked after the
    // entries, so that a bad entry is reported before a checkpoint that
    // disagrees with it.
    let mut unverified = Vec::new();
    for (i, note) in external.iter().enumerate() {
        let body = grantline_proto::audit::note::body(note).unwrap_or_default();
        match Checkpoint::parse_body(body) {
            Ok(cp) => unverified.push((i + 1, note, cp.size)),
            Err(e) => {
                return Ok(Err(Failure { seq: -1, reason: format!("given checkpoint #{} is not usable: {e}", i + 1) }))
            }
        }
    }
    let bar = (progress && total >= 10_000).then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("verifying {bar:40} {pos}/{len} entries ({per_sec}, eta {eta})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut verifier = ChainVerifier::trusting(trusted.to_vec());
    for (_, _, size) in &unverified {
        verifier.want_root_at(*size);
    }
    // A database from before checkpoints existed has no such table: no
    // checkpoints. Any other failure to read them fails the verification.
    let has_checkpoints = store.has_table("checkpoints").context("cannot read the database schema")?;
    let mut stored = StoredCheckpoints { store: &store, page: Vec::new().into_iter(), after: None, last: None };
    let mut next = if has_checkpoints { stored.next()? } else { None };
    let mut n = 0u64;
    // After each entry, the checkpoints whose tree it completes.
    let walked = store.for_each(|row| {
        n += 1;
        if let Some(b) = &bar {
            if n.is_multiple_of(4096) {
                b.set_position(n);
            }
        }
        verifier.push(row)?;
        check_stored(&mut verifier, &mut stored, &mut next)
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let summary = match walked {
        Err(failure) => return Ok(Err(failure)),
        Ok(read) => {
            read.with_context(|| format!("cannot read {}", db.display()))?;
            let summary = match verifier.finish() {
                Ok(s) => s,
                Err(f) => return Ok(Err(f)),
            };
            if let Some((size, _)) = next {
                return Ok(Err(truncated(summary.entries, "stored checkpoint", size)));
            }
            summary
        }
    };
    let mut checkpoints = Vec::new();
    for (i, note, size) in unverified {
        match Checkpoint::open_any(note, &summary.keys) {
            Ok(cp) => checkpoints.push((i, cp)),
            Err(e) => {
                let seq = i64::try_from(size).unwrap_or(i64::MAX);
                return Ok(Err(Failure {
                    seq,
                    reason: format!("given checkpoint #{i} of size {size} does not verify: {e}"),
                }));
            }
        }
    }
    // A rotation that ends the log has been signed only by the key it
    // retires: the new key must vouch for it in a checkpoint, as
    // `rotate-key` writes one, or a holder of the old key could have added it.
    // Only a checkpoint of the whole log covers the final entry.
    if let (Some(seq), Some(current)) = (summary.unendorsed_rotation, summary.keys.last()) {
        // A stored checkpoint of the whole log has had its root checked in
        // the walk; a given one is checked against the roots recorded.
        let stored_endorses = stored
            .last
            .as_ref()
            .filter(|(size, _)| *size == summary.entries && *size > seq)
            .is_some_and(|(_, note)| Checkpoint::open(note, current).is_ok());
        let endorsed = stored_endorses
            || external
                .iter()
                .filter_map(|note| Checkpoint::open(note, current).ok())
                .any(|cp| cp.size > seq && summary.roots.get(&cp.size) == Some(&cp.root));
        if !endorsed {
            return Ok(Err(Failure {
                seq: i64::try_from(seq).unwrap_or(i64::MAX),
                reason: format!(
                    "the log ends with a rotation to key {current} that nothing signed by that key covers \
                     (no later entry, no checkpoint): a holder of the retired key could have written it"
                ),
            }));
        }
    }
    checkpoints.sort_by_key(|(_, cp)| cp.size);
    for (i, cp) in &checkpoints {
        let what = format!("given checkpoint #{i}");
        let Some(root) = summary.roots.get(&cp.size) else {
            return Ok(Err(truncated(summary.entries, &what, cp.size)));
        };
        if *root != cp.root {
            return Ok(Err(fork(&what, cp.size, &cp.root, root)));
        }
    }
    Ok(Ok(summary))
}

/// The stored checkpoints, smallest first, read a page at a time; `last`
/// keeps the most recent one checked (for the endorsement of a final rotation).
struct StoredCheckpoints<'a> {
    store: &'a AuditStore,
    page: std::vec::IntoIter<(u64, String)>,
    after: Option<u64>,
    last: Option<(u64, String)>,
}

impl StoredCheckpoints<'_> {
    fn next(&mut self) -> Result<Option<(u64, String)>> {
        if let Some(cp) = self.page.next() {
            self.after = Some(cp.0);
            return Ok(Some(cp));
        }
        self.page =
            self.store.checkpoints_after(self.after, CHECKPOINT_PAGE).context("cannot read checkpoints")?.into_iter();
        let cp = self.page.next();
        if let Some((size, _)) = &cp {
            self.after = Some(*size);
        }
        Ok(cp)
    }
}

/// Checks every stored checkpoint whose tree the walk has just completed:
/// its note must cover the size it is stored under, be signed by a key the
/// log has reached, and give the root the entries hash to.
fn check_stored(
    verifier: &mut ChainVerifier,
    stored: &mut StoredCheckpoints<'_>,
    next: &mut Option<(u64, String)>,
) -> Result<(), Failure> {
    let unreadable = |e: anyhow::Error| Failure { seq: -1, reason: format!("{e:#}") };
    while let Some((size, note)) = next.take() {
        // The empty tree's checkpoint is checked once the genesis entry has
        // named the key that signs it.
        let ready = if size == 0 { verifier.size() == 1 } else { size == verifier.size() };
        if !ready {
            *next = Some((size, note));
            return Ok(());
        }
        let root = if size == 0 { grantline_proto::audit::merkle::empty_root() } else { verifier.root() };
        let seq = i64::try_from(size).unwrap_or(i64::MAX) - 1;
        let body = grantline_proto::audit::note::body(&note).unwrap_or_default();
        let failure = match Checkpoint::parse_body(body) {
            Err(e) => Some(Failure { seq: -1, reason: format!("a stored checkpoint is not usable: {e}") }),
            Ok(cp) if cp.size != size => Some(Failure {
                seq,
                reason: format!("a stored checkpoint covers {} entries but is stored as covering {size}", cp.size),
            }),
            Ok(_) => match Checkpoint::open_any(&note, verifier.keys()) {
                Err(e) => Some(Failure {
                    seq: i64::try_from(size).unwrap_or(i64::MAX),
                    reason: format!("a stored checkpoint of size {size} does not verify: {e}"),
                }),
                Ok(cp) if cp.root != root => Some(fork("stored checkpoint", size, &cp.root, &root)),
                Ok(_) => None,
            },
        };
        if let Some(f) = failure {
            // An earlier entry whose signature is still pending fails first.
            verifier.flush_signatures()?;
            return Err(f);
        }
        stored.last = Some((size, note));
        *next = stored.next().map_err(unreadable)?;
    }
    Ok(())
}

fn truncated(entries: u64, what: &str, size: u64) -> Failure {
    Failure {
        seq: i64::try_from(entries).unwrap_or(i64::MAX),
        reason: format!(
            "the log ends after {entries} entries but a {what} signed by the log covers {size}: entries were truncated or the log was rolled back"
        ),
    }
}

fn fork(what: &str, size: u64, claimed: &[u8; 32], computed: &[u8; 32]) -> Failure {
    Failure {
        seq: i64::try_from(size).unwrap_or(i64::MAX) - 1,
        reason: format!(
            "fork: a {what} signed by the log gives the first {size} entries the root {}, but they hash to {}",
            hex::encode(claimed),
            hex::encode(computed)
        ),
    }
}

/// Verifies a log from its anchor alone: the checkpoint's signature, every
/// entry in the entry bundles (encoding, chain, seq, origin, time; the
/// checkpoint's signature vouches for them, as a tiles client would take it),
/// that they hash to the checkpoint's root, and that every tile agrees with
/// them. Returns the verdict and the anchor's checkpoint note.
///
/// Entry bundles carry no signatures, so the anchor cannot prove a key
/// rotation: the checkpoint must be signed by one of `checkpoint_keys` (the
/// last key of the history given, or the keys a verified database reached),
/// never by a key that the anchor's own entries name. `history` is what the
/// entries' genesis and rotations are checked against.
///
/// An entry bundle past the checkpoint fails the log (an older checkpoint
/// put back), unless a larger signed checkpoint takes its place within a
/// few seconds (a running broker writes its bundles, then their
/// checkpoint); a checkpoint seen to go back is a rollback. Both are
/// checked before the entries are read.
pub async fn verify_anchor(
    anchor: &Anchor,
    history: &[VerifierKey],
    checkpoint_keys: &[VerifierKey],
) -> Result<(Result<Summary, Failure>, String)> {
    let mut note = anchor_checkpoint(anchor).await?;
    // The signature first: nothing the anchor says (its size above all) is
    // used before a trusted key vouches for it.
    let mut cp = match Checkpoint::open_any(&note, checkpoint_keys) {
        Ok(cp) => cp,
        Err(e) => {
            let reason = format!(
                "the anchor's checkpoint does not verify under the keys given: {e} (the anchor cannot prove a key \
                 rotation: give the key history STATE_DIR/audit.vkeys, whose last key must have signed it, or \
                 verify with --db too)"
            );
            return Ok((Err(Failure { seq: -1, reason }), note));
        }
    };
    let fail = |seq: u64, reason: String| Failure { seq: i64::try_from(seq).unwrap_or(i64::MAX), reason };
    for waited in 0..=3 {
        let Some(path) = anchor.bundle_beyond(cp.size).await? else { break };
        let next = if waited < 3 { larger_checkpoint(anchor, &cp, checkpoint_keys).await? } else { Next::Same };
        match next {
            Next::Larger(n, c) => (note, cp) = (n, c),
            Next::Smaller(size) => {
                let reason = format!(
                    "the anchor's checkpoint went back from size {} to {size} while it was read: two checkpoints \
                     signed by the log's key prove a rollback of the anchor",
                    cp.size
                );
                return Ok((Err(fail(size, reason)), note));
            }
            Next::Same => {
                let reason = format!(
                    "the anchor holds {path}, entries past its checkpoint of size {}: the checkpoint was put back \
                     to an older one (a rollback), or the broker stopped between publishing entries and their \
                     checkpoint (a running broker covers them with its next checkpoint)",
                    cp.size
                );
                return Ok((Err(fail(cp.size, reason)), note));
            }
        }
    }
    verify_anchor_at(anchor, history, note, cp).await
}

/// What the anchor's checkpoint became after `cp`.
enum Next {
    Larger(String, Checkpoint),
    Smaller(u64),
    Same,
}

/// Waits up to 3 s for the anchor's checkpoint to be replaced by a larger
/// one signed by `keys`; one smaller is reported at once.
async fn larger_checkpoint(anchor: &Anchor, cp: &Checkpoint, keys: &[VerifierKey]) -> Result<Next> {
    for _ in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let note = anchor_checkpoint(anchor).await?;
        match Checkpoint::open_any(&note, keys) {
            Ok(c) if c.size > cp.size => return Ok(Next::Larger(note, c)),
            Ok(c) if c.size < cp.size => return Ok(Next::Smaller(c.size)),
            _ => {}
        }
    }
    Ok(Next::Same)
}

/// Verifies the anchor's entries and tiles against `cp`, its checkpoint.
async fn verify_anchor_at(
    anchor: &Anchor,
    history: &[VerifierKey],
    note: String,
    cp: Checkpoint,
) -> Result<(Result<Summary, Failure>, String)> {
    let fail = |seq: u64, reason: String| Failure { seq: i64::try_from(seq).unwrap_or(i64::MAX), reason };
    let mut verifier = ChainVerifier::trusting(history.to_vec()).without_signatures();
    verifier.want_root_at(cp.size);
    let mut tree = MemoryTree::default();
    for t in tiles::new_tiles(0, 0, cp.size) {
        let start = t.index * tiles::TILE_WIDTH;
        let path = tiles::bundle_path(t.index, t.width);
        let Some(bytes) = anchor.get(&path).await? else {
            return Ok((
                Err(fail(start, format!("the anchor lacks {path}, which its checkpoint of size {} needs", cp.size))),
                note,
            ));
        };
        let entries = match tiles::parse_bundle(&bytes) {
            Ok(e) if e.len() as u64 == t.width => e,
            Ok(e) => return Ok((Err(fail(start, format!("{path} holds {} entries, not {}", e.len(), t.width))), note)),
            Err(e) => return Ok((Err(fail(start, format!("{path} is malformed: {e}"))), note)),
        };
        for (i, entry) in entries.into_iter().enumerate() {
            let hash = leaf_hash(entry);
            tree.push(hash);
            let row = StoredEntry {
                seq: i64::try_from(start + i as u64).unwrap_or(i64::MAX),
                entry: entry.to_vec(),
                hash: hash.to_vec(),
                signature: Vec::new(),
            };
            if let Err(f) = verifier.push(row) {
                return Ok((Err(f), note));
            }
        }
    }
    let summary = match verifier.finish() {
        Ok(s) => s,
        Err(f) => return Ok((Err(f), note)),
    };
    if summary.roots.get(&cp.size) != Some(&cp.root) {
        let reason = format!("the anchor's entries do not hash to the root of its checkpoint of size {}: the anchor was rewritten or forked", cp.size);
        return Ok((Err(fail(cp.size.saturating_sub(1), reason)), note));
    }
    for level in 0..tiles::levels(cp.size) {
        let stored = tree.level(level * tiles::TILE_HEIGHT);
        for t in tiles::new_tiles(level, 0, cp.size) {
            let path = tiles::tile_path(level, t.index, t.width);
            let first_leaf = (t.index * tiles::TILE_WIDTH) << (u32::from(level) * 8);
            let Some(bytes) = anchor.get(&path).await? else {
                return Ok((Err(fail(first_leaf, format!("the anchor lacks tile {path}"))), note));
            };
            let start = usize::try_from(t.index * tiles::TILE_WIDTH).unwrap_or(usize::MAX);
            let want = stored.get(start..start + usize::try_from(t.width).unwrap_or(0));
            if tiles::parse_tile(&bytes).ok().as_deref() != want {
                return Ok((Err(fail(first_leaf, format!("tile {path} disagrees with the entries"))), note));
            }
        }
    }
    Ok((Ok(summary), note))
}

/// The anchor's latest checkpoint note.
pub async fn anchor_checkpoint(anchor: &Anchor) -> Result<String> {
    let note = anchor.get("checkpoint").await?.context("the anchor holds no checkpoint")?;
    String::from_utf8(note).context("the anchor's checkpoint is not text")
}

#[cfg(test)]
mod tests;
