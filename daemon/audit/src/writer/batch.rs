//! How the writer gathers a batch and signs it: the group-commit window
//! under load, and signatures spread over the cores for big batches.

use std::time::Duration;

use grantline_proto::audit::SignerKey;

use crate::store::NewEntry;

/// The most entries one transaction commits.
pub(super) const MAX_BATCH: usize = 4096;

/// Group commit under load: when the last batch held at least `BUSY_BATCH`
/// entries and the next arrived while the writer was still busy or within
/// a window of it, appends are arriving faster than commits, and the
/// writer lets the batch gather for `COMMIT_WINDOW` before committing it. A
/// commit (its fsync, and rewriting the same rightmost pages of each table)
/// costs far more than an entry, so on a busy broker this cuts the CPU per
/// grant by a quarter (RFD 0008 § Group commit under load), for at most
/// `COMMIT_WINDOW` added to the batch an append joins; a broker granting one
/// credential at a time, or idle for a window, never waits.
pub(super) const COMMIT_WINDOW: Duration = Duration::from_millis(3);
pub(super) const BUSY_BATCH: usize = 4;

/// How long a batch gathers before its commit: `previous` entries were
/// committed last, the writer then waited `idle` for this batch's first
/// entry, and `queued` more wait behind it.
pub(super) fn commit_window(previous: usize, idle: Duration, queued: usize) -> Option<Duration> {
    let busy = previous >= BUSY_BATCH && idle < COMMIT_WINDOW;
    // A batch that is already full gathers nothing by waiting.
    (busy && queued.saturating_add(1) < MAX_BATCH).then_some(COMMIT_WINDOW)
}

/// Signs a batch of entries, spread over the machine's cores when it is big
/// enough to pay for the threads.
pub(super) fn sign_all(key: &SignerKey, entries: &mut [NewEntry]) {
    const PER_THREAD: usize = 256;
    // Read once: asking costs three file reads (the cgroup's CPU quota),
    // which every batch paid before.
    static THREADS: std::sync::LazyLock<usize> =
        std::sync::LazyLock::new(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get));
    let threads = *THREADS;
    if entries.len() < 2 * PER_THREAD || threads == 1 {
        for e in entries.iter_mut() {
            e.signature = key.sign(&e.entry);
        }
        return;
    }
    let chunk = entries.len().div_ceil(threads).max(PER_THREAD);
    std::thread::scope(|s| {
        for part in entries.chunks_mut(chunk) {
            s.spawn(move || {
                for e in part {
                    e.signature = key.sign(&e.entry);
                }
            });
        }
    });
}
