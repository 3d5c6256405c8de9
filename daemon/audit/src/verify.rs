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
pub async fn verify_anchor(
    anchor: &Anchor,
    history: &[VerifierKey],
    checkpoint_keys: &[VerifierKey],
) -> Result<(Result<Summary, Failure>, String)> {
    let trusted = checkpoint_keys;
    let note = anchor_checkpoint(anchor).await?;
    // Read for its size now; its signature is checked once the entries have
    // told which keys the log has used.
    // The signature first: nothing the anchor says (its size above all) is
    // used before a trusted key vouches for it.
    let cp = match Checkpoint::open_any(&note, trusted) {
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

/// One broker's log in a fleet verification: where it was read and its verdict.
#[derive(Debug, Clone)]
pub struct FleetLog {
    pub db: String,
    pub verdict: Result<Summary, Failure>,
}

/// The verdict over several brokers' logs (RFD 0008): each log verified
/// against its own key, and together they must be distinct logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetVerdict {
    pub ok: bool,
    pub entries: u64,
    pub first_time_ms: Option<i64>,
    pub last_time_ms: Option<i64>,
    /// What is wrong across the logs, each with what to do.
    pub problems: Vec<String>,
}

/// Merges per-log verdicts: all must verify, no origin may appear twice
/// (each broker signs its own log under its own name), and the entry count
/// and time span are the fleet's.
pub fn fleet_verdict(logs: &[FleetLog]) -> FleetVerdict {
    let mut problems = Vec::new();
    let mut by_origin: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
    for log in logs {
        match &log.verdict {
            Ok(s) => by_origin.entry(s.origin.as_str()).or_default().push(log.db.as_str()),
            Err(f) => problems.push(format!("{}: FAILED at seq {}: {}", log.db, f.seq, f.reason)),
        }
    }
    for (origin, dbs) in &by_origin {
        if dbs.len() > 1 {
            problems.push(format!(
                "{} logs claim origin {origin} ({}): each broker must sign its own log under its own origin; \
                 a copy was given twice, or two brokers share a key",
                dbs.len(),
                dbs.join(", ")
            ));
        }
    }
    let ok_logs = || logs.iter().filter_map(|l| l.verdict.as_ref().ok());
    FleetVerdict {
        ok: problems.is_empty() && !logs.is_empty(),
        entries: ok_logs().map(|s| s.entries).sum(),
        first_time_ms: ok_logs().filter_map(|s| s.first_time_ms).min(),
        last_time_ms: ok_logs().filter_map(|s| s.last_time_ms).max(),
        problems,
    }
}

/// One entry of a fleet's merged timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineEntry {
    pub time_ms: i64,
    pub origin: String,
    pub seq: u64,
    /// The event exactly as signed (JSON).
    pub event_json: Vec<u8>,
}

/// Merges several logs' entry streams, each in its own seq order, into one
/// stream, earliest time first (ties: the earlier log given). Within a log
/// the order is kept even if its clock stepped back.
pub fn merge_by_time<I: Iterator<Item = TimelineEntry>>(streams: Vec<I>) -> impl Iterator<Item = TimelineEntry> {
    use std::cmp::Reverse;
    let mut streams = streams;
    let mut heads: Vec<Option<TimelineEntry>> = streams.iter_mut().map(Iterator::next).collect();
    let mut queue: std::collections::BinaryHeap<Reverse<(i64, usize)>> =
        heads.iter().enumerate().filter_map(|(i, h)| h.as_ref().map(|e| Reverse((e.time_ms, i)))).collect();
    std::iter::from_fn(move || {
        let Reverse((_, i)) = queue.pop()?;
        let out = heads[i].take();
        heads[i] = streams[i].next();
        if let Some(next) = &heads[i] {
            queue.push(Reverse((next.time_ms, i)));
        }
        out
    })
}

/// A verified log's entries in seq order, read in batches: exactly the
/// `verified.entries` entries whose chain ends at `verified.head`, each
/// re-hashed and linked as read, so a database changed after its
/// verification yields an error rather than unverified rows.
pub fn log_entries(db: &Path, verified: &Summary) -> Result<impl Iterator<Item = Result<TimelineEntry>>> {
    let store = AuditStore::open_untrusted(db).with_context(|| format!("cannot open {}", db.display()))?;
    let (total, head) = (verified.entries, verified.head.clone());
    let mut next = 0u64;
    let mut prev = grantline_proto::audit::ZERO_HASH;
    let mut batch = std::collections::VecDeque::new();
    let db = db.display().to_string();
    Ok(std::iter::from_fn(move || {
        if next >= total {
            return None;
        }
        if batch.is_empty() {
            match store.stored_range(next, total, 1000) {
                Ok(rows) => batch.extend(rows),
                Err(e) => return Some(Err(anyhow::anyhow!("cannot read {db}: {e}"))),
            }
        }
        let at = next;
        let changed =
            || Some(Err(anyhow::anyhow!("{db} changed after it was verified (at seq {at}); verify it again")));
        let Some(row) = batch.pop_front() else { return changed() };
        let Ok(e) = grantline_proto::audit::Entry::decode(&row.entry) else { return changed() };
        let hash = leaf_hash(&row.entry);
        if u64::try_from(row.seq).ok() != Some(next) || e.seq != next || e.prev != prev {
            return changed();
        }
        prev = hash;
        next += 1;
        if next == total && hex::encode(hash) != head {
            return changed();
        }
        Some(Ok(TimelineEntry {
            time_ms: e.time_ms,
            origin: e.origin.to_owned(),
            seq: e.seq,
            event_json: e.event_json.to_vec(),
        }))
    }))
}

#[cfg(test)]
mod fleet_tests {
    use super::*;

    fn log(db: &str, origin: &str, entries: u64, span: (i64, i64)) -> FleetLog {
        FleetLog {
            db: db.into(),
            verdict: Ok(Summary {
                entries,
                origin: origin.into(),
                head: String::new(),
                root: String::new(),
                first_time_ms: Some(span.0),
                last_time_ms: Some(span.1),
                roots: std::collections::BTreeMap::new(),
                keys: Vec::new(),
                unendorsed_rotation: None,
            }),
        }
    }

    #[test]
    fn a_fleet_verifies_when_every_log_does_and_no_origin_repeats() {
        let a = log("a.db", "grantline/a", 10, (100, 500));
        let b = log("b.db", "grantline/b", 5, (50, 300));
        let v = fleet_verdict(&[a.clone(), b.clone()]);
        assert_eq!(
            v,
            FleetVerdict { ok: true, entries: 15, first_time_ms: Some(50), last_time_ms: Some(500), problems: vec![] }
        );

        let twice = fleet_verdict(&[a.clone(), log("copy.db", "grantline/a", 10, (100, 500))]);
        assert!(!twice.ok);
        assert!(twice.problems[0].contains("2 logs claim origin grantline/a (a.db, copy.db)"), "{twice:?}");

        let bad = FleetLog { db: "c.db".into(), verdict: Err(Failure { seq: 3, reason: "bad signature".into() }) };
        let broken = fleet_verdict(&[a, bad, b]);
        assert!(!broken.ok);
        assert_eq!(broken.problems, vec!["c.db: FAILED at seq 3: bad signature".to_owned()]);
        assert_eq!(broken.entries, 15, "the logs that verify still count");

        assert!(!fleet_verdict(&[]).ok, "no logs verify nothing");
    }

    fn at(origin: &str, seq: u64, time_ms: i64) -> TimelineEntry {
        TimelineEntry { time_ms, origin: origin.into(), seq, event_json: Vec::new() }
    }

    #[test]
    fn timelines_merge_earliest_first_and_keep_each_log_in_order() {
        let a = vec![at("a", 0, 10), at("a", 1, 30), at("a", 2, 20), at("a", 3, 50)];
        let b = vec![at("b", 0, 5), at("b", 1, 30), at("b", 2, 40)];
        let merged: Vec<(String, u64)> =
            merge_by_time(vec![a.into_iter(), b.into_iter()]).map(|e| (e.origin, e.seq)).collect();
        let want = [("b", 0), ("a", 0), ("a", 1), ("a", 2), ("b", 1), ("b", 2), ("a", 3)];
        assert_eq!(merged, want.map(|(o, s)| (o.to_owned(), s)).to_vec());
        let none: Vec<std::vec::IntoIter<TimelineEntry>> = vec![Vec::new().into_iter()];
        assert_eq!(merge_by_time(none).count(), 0);
    }
}

#[cfg(test)]
mod checkpoint_tests {
    use grantline_proto::audit::{Event, SignerKey};

    use super::*;
    use crate::AuditLog;

    /// A log of `n` entries under `key` (genesis included), with a stored
    /// checkpoint at every size: more than one page of them.
    fn log_with_a_checkpoint_per_entry(dir: &Path, key: &SignerKey, n: u64) -> std::path::PathBuf {
        let db = dir.join("audit.db");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let copy = SignerKey::parse(&key.to_private_string()).unwrap();
        let (log, writer) = AuditLog::start(&db, copy, "test").unwrap();
        rt.block_on(async {
            for i in 1..n {
                let e = Event::LeaseRevocation { node: "n".into(), lease: format!("{i}"), reason: String::new() };
                log.append(e).await.unwrap();
            }
        });
        drop(log);
        writer.join().unwrap();
        let store = AuditStore::open(&db).unwrap();
        let mut v = ChainVerifier::new(key.verifier().clone());
        for size in 0..=n {
            v.want_root_at(size);
        }
        store.for_each(|row| v.push(row)).unwrap().unwrap();
        let summary = v.finish().unwrap();
        for (size, root) in summary.roots {
            let cp = Checkpoint { origin: summary.origin.clone(), size, root };
            store.add_checkpoint(size, 0, &cp.sign(key).unwrap()).unwrap();
        }
        db
    }

    fn insert(db: &Path, size: i64, note: &str) {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute(
            "INSERT OR REPLACE INTO checkpoints (size, time_ms, note) VALUES (?1, 0, ?2)",
            rusqlite::params![size, note],
        )
        .map_err(|e| e.to_string())
        .or_else(|_| {
            conn.execute_batch(
                "DROP TRIGGER IF EXISTS checkpoints_no_update; DROP TRIGGER IF EXISTS checkpoints_no_delete;",
            )
            .unwrap();
            conn.execute(
                "INSERT OR REPLACE INTO checkpoints (size, time_ms, note) VALUES (?1, 0, ?2)",
                rusqlite::params![size, note],
            )
        })
        .unwrap();
    }

    /// Stored checkpoints are checked in step with the entries, a page at a
    /// time (the verifier once held them all in memory, and refused a log
    /// whose checkpoints passed 2 GiB): every one of 2,500 verifies, and
    /// each way one can be wrong is reported at its size.
    #[test]
    fn stored_checkpoints_are_checked_in_step_page_by_page() {
        let dir = tempfile::tempdir().unwrap();
        let key = SignerKey::generate("t.example/log").unwrap();
        let n = 2_500;
        let db = log_with_a_checkpoint_per_entry(dir.path(), &key, n);
        let trusted = [key.verifier().clone()];
        let summary = verify_db(&db, &trusted, false, &[]).unwrap().unwrap();
        assert_eq!(summary.entries, n);

        let fail = |db: &Path| verify_db(db, &trusted, false, &[]).unwrap().unwrap_err();
        let copy = |name: &str| {
            let p = dir.path().join(name);
            std::fs::copy(&db, &p).unwrap();
            p
        };
        let other = SignerKey::generate("t.example/log").unwrap();
        let root_at = |size: u64| {
            let body = grantline_proto::audit::note::body(&latest_at(&db, size)).unwrap().to_owned();
            Checkpoint::parse_body(&body).unwrap().root
        };
        // A checkpoint at 1,700 (the second page) signed by a key the log never had.
        let foreign = copy("foreign.db");
        let cp = Checkpoint { origin: "t.example/log".into(), size: 1_700, root: root_at(1_700) };
        insert(&foreign, 1_700, &cp.sign(&other).unwrap());
        let f = fail(&foreign);
        assert!(f.reason.contains("of size 1700 does not verify"), "{f:?}");
        // One whose root is not the entries'.
        let forked = copy("forked.db");
        let cp = Checkpoint { origin: "t.example/log".into(), size: 1_200, root: root_at(7) };
        insert(&forked, 1_200, &cp.sign(&key).unwrap());
        let f = fail(&forked);
        assert!(f.reason.starts_with("fork: a stored checkpoint") && f.seq == 1_199, "{f:?}");
        // One stored under a size its note does not cover.
        let moved = copy("moved.db");
        insert(&moved, 900, &latest_at(&db, 901));
        let f = fail(&moved);
        assert!(f.reason.contains("covers 901 entries but is stored as covering 900"), "{f:?}");
        // One past the end: the log was truncated.
        let past = copy("past.db");
        let cp = Checkpoint { origin: "t.example/log".into(), size: n + 5, root: root_at(7) };
        insert(&past, i64::try_from(n + 5).unwrap(), &cp.sign(&key).unwrap());
        let f = fail(&past);
        assert!(f.reason.contains("truncated or the log was rolled back"), "{f:?}");
    }

    /// A checkpoints table rebuilt without its key (or loosely typed) made
    /// paging quadratic and let rows repeat or hide; a negative size was
    /// skipped. Both are refused now, whatever the rows say.
    #[test]
    fn a_checkpoints_table_not_of_grantline_s_shape_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = SignerKey::generate("t.example/log").unwrap();
        let db = log_with_a_checkpoint_per_entry(dir.path(), &key, 20);
        let trusted = [key.verifier().clone()];
        let rebuilt = |name: &str, table: &str| {
            let p = dir.path().join(name);
            std::fs::copy(&db, &p).unwrap();
            let conn = rusqlite::Connection::open(&p).unwrap();
            conn.execute_batch(&format!(
                "DROP TRIGGER checkpoints_no_update; DROP TRIGGER checkpoints_no_delete;
                 ALTER TABLE checkpoints RENAME TO old; {table};
                 INSERT INTO checkpoints SELECT size, time_ms, note FROM old; DROP TABLE old;"
            ))
            .unwrap();
            p
        };
        for (name, table) in [
            (
                "nokey.db",
                "CREATE TABLE checkpoints (size INTEGER NOT NULL, time_ms INTEGER NOT NULL, note TEXT NOT NULL) STRICT",
            ),
            ("loose.db", "CREATE TABLE checkpoints (size INTEGER PRIMARY KEY, time_ms INTEGER, note TEXT)"),
            (
                "any.db",
                "CREATE TABLE checkpoints (size ANY PRIMARY KEY, time_ms INTEGER NOT NULL, note TEXT NOT NULL) STRICT",
            ),
        ] {
            let p = rebuilt(name, table);
            let err = format!("{:#}", verify_db(&p, &trusted, false, &[]).unwrap_err());
            assert!(err.contains("table checkpoints is not Grantline's"), "{name}: {err}");
        }
        let negative = rebuilt(
            "negative.db",
            "CREATE TABLE checkpoints (size INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL, note TEXT NOT NULL) STRICT",
        );
        rusqlite::Connection::open(&negative)
            .unwrap()
            .execute("INSERT INTO checkpoints VALUES (-5, 0, 'hidden')", [])
            .unwrap();
        let err = format!("{:#}", verify_db(&negative, &trusted, false, &[]).unwrap_err());
        assert!(err.contains("negative size -5"), "{err}");
    }

    fn latest_at(db: &Path, size: u64) -> String {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.query_row("SELECT note FROM checkpoints WHERE size = ?1", [i64::try_from(size).unwrap()], |r| r.get(0))
            .unwrap()
    }
}
