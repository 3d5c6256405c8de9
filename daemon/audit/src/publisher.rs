//! The broker's publisher: every checkpoint the audit writer signs goes to
//! the anchor with what it covers, and the checkpoint is written again
//! every heartbeat while nothing is new (RFD 0005, RFD 0010).

use std::path::Path as FsPath;

use grantline_proto::audit::checkpoint::Checkpoint;
use grantline_proto::audit::VerifierKey;
use tokio::sync::watch;

use crate::anchor::Anchor;

/// Publishes every new checkpoint the writer signs, with what it covers,
/// and writes the checkpoint again every `heartbeat` when nothing is new,
/// so that a reader of the anchor can tell that this broker still
/// publishes (`verify-fleet` names one whose checkpoint has gone stale).
pub async fn publish_loop(
    anchor: Anchor,
    db: std::path::PathBuf,
    keys: Vec<VerifierKey>,
    mut checkpoints: watch::Receiver<Option<String>>,
    heartbeat: std::time::Duration,
) {
    // What the anchor holds of this log, once known; until then (the anchor
    // unreadable, or holding another log) nothing is written.
    let mut published = None;
    let mut again = false;
    loop {
        if published.is_none() {
            match anchor.published_size(&keys, &db).await {
                Ok(size) => published = Some(size),
                Err(e) => {
                    metrics::counter!("grantline_anchor_publish_failures_total").increment(1);
                    tracing::error!(error = %format!("{e:#}"), "cannot publish to the anchor; will look again");
                }
            }
        }
        let note = checkpoints.borrow_and_update().clone();
        if let (Some(size), Some(key)) = (published.as_mut(), keys.last()) {
            publish_note(&anchor, &db, key, note.as_deref(), size, again).await;
        }
        tokio::select! {
            changed = checkpoints.changed() => {
                if changed.is_err() {
                    // The writer stopped; its last checkpoint may still be unpublished.
                    let note = checkpoints.borrow().clone();
                    if let (Some(size), Some(key)) = (published.as_mut(), keys.last()) {
                        publish_note(&anchor, &db, key, note.as_deref(), size, false).await;
                    }
                    return;
                }
                again = false;
            }
            () = tokio::time::sleep(heartbeat) => again = true,
        }
    }
}

/// Publishes `note` if it covers more than the anchor has, or writes it
/// again when `again` and it is the one published.
async fn publish_note(
    anchor: &Anchor,
    db: &FsPath,
    key: &VerifierKey,
    note: Option<&str>,
    published: &mut u64,
    again: bool,
) {
    let Some(note) = note else { return };
    let failed = |e: anyhow::Error, what: &str| {
        metrics::counter!("grantline_anchor_publish_failures_total").increment(1);
        tracing::error!(error = %format!("{e:#}"), "{what}");
    };
    match Checkpoint::open(note, key) {
        Ok(cp) if cp.size > *published => match anchor.publish(db, *published, cp.size, note).await {
            Ok(()) => {
                tracing::debug!(size = cp.size, "published to the anchor");
                *published = cp.size;
                metrics::gauge!("grantline_anchor_published_entries").set(cp.size as f64);
            }
            Err(e) => failed(e, "publishing to the anchor failed; will retry"),
        },
        Ok(cp) if again && cp.size == *published => {
            if let Err(e) = anchor.put_checkpoint(note).await {
                failed(e, "writing the checkpoint to the anchor again failed");
            }
        }
        Ok(cp) if cp.size < *published => failed(
            anyhow::anyhow!(
                "anchor {} holds a checkpoint of {} entries, this log's newest has {}: it is not published \
                 over the larger one",
                anchor.url(),
                *published,
                cp.size
            ),
            "the anchor is ahead of the log",
        ),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "the writer's checkpoint does not verify"),
    }
}
