//! `grantline audit verify-fleet` and `audit timeline`: the verdicts of
//! several brokers' logs together, and their entries merged by time.

use std::path::Path;

use anyhow::{Context, Result};
use grantline_proto::audit::entry::leaf_hash;
use grantline_proto::audit::{Failure, Summary};

use crate::AuditStore;

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
mod tests;
