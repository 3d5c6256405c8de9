//! Anchoring: publishes the log through `object_store` in the C2SP tlog-tiles
//! layout — entry bundles, tiles, then the checkpoint — so that a standard
//! tiles client, or `grantline audit verify --anchor`, can check it from
//! outside the broker. Immutable objects are written with create-only puts;
//! only `checkpoint` is overwritten.
//!
//! Several brokers share one anchor by each publishing under a prefix of
//! its own, named by its origin ([`origin_segment`]).

mod access;
pub use access::{parse_options, Access};

use std::path::Path as FsPath;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use grantline_proto::audit::checkpoint::Checkpoint;
use grantline_proto::audit::tiles::{self, TileRef, TILE_HEIGHT, TILE_WIDTH};
use grantline_proto::audit::VerifierKey;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutMode, PutOptions, PutPayload};
use tokio::sync::watch;

use super::AuditStore;

/// The largest object a log publishes: an entry bundle of 256 entries of
/// the largest size, each with its two-byte length.
pub const MAX_OBJECT_BYTES: u64 = 256 * (grantline_proto::audit::entry::MAX_ENTRY_LEN as u64 + 2);

/// Where the log is published.
#[derive(Clone)]
pub struct Anchor {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
}

impl std::fmt::Debug for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Anchor({})", self.url)
    }
}

impl Anchor {
    /// Opens an anchor by URL (`file:///…`, `s3://…`, `gs://…`, `az://…`) or
    /// local directory path; cloud credentials come from the environment
    /// and `access`'s options file.
    pub fn open(location: &str, access: &Access) -> Result<Self> {
        Self::open_with(location, access, true)
    }

    /// Opens an anchor to read it: a local directory must already exist.
    pub fn open_existing(location: &str, access: &Access) -> Result<Self> {
        Self::open_with(location, access, false)
    }

    fn open_with(location: &str, access: &Access, create: bool) -> Result<Self> {
        let url = if location.contains("://") {
            parse_url(location)?
        } else {
            refuse_url_like(location)?;
            let dir = FsPath::new(location);
            if create {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create anchor directory {location}"))?;
            }
            let abs =
                std::fs::canonicalize(dir).with_context(|| format!("anchor directory {location} does not exist"))?;
            url::Url::from_directory_path(&abs)
                .map_err(|()| anyhow::anyhow!("anchor path {location:?} is not usable"))?
        };
        let options = checked_options(&url, access)?;
        let (store, prefix) =
            object_store::parse_url_opts(&url, options).with_context(|| format!("cannot open anchor {url}"))?;
        Ok(Self { store: Arc::from(store), prefix, url: url.to_string() })
    }

    /// The anchor of one broker's log within a fleet's shared anchor.
    pub fn for_origin(&self, origin: &str) -> Self {
        self.for_origin_segment(&origin_segment(origin))
    }

    /// The anchor under one prefix of a fleet's shared anchor.
    pub fn for_origin_segment(&self, segment: &str) -> Self {
        Self {
            store: self.store.clone(),
            prefix: self.prefix.clone().join(segment),
            url: format!("{}/{segment}", self.url.trim_end_matches('/')),
        }
    }

    /// The log of `origin` here: this anchor when it holds a checkpoint,
    /// else the origin's prefix of a fleet's shared anchor if that does;
    /// both holding one is refused, so that the anchor cannot choose which
    /// of two logs is verified.
    pub async fn log_of(self, origin: &str) -> Result<Self> {
        let fleet = self.for_origin(origin);
        match (self.checkpoint_written().await?.is_some(), fleet.checkpoint_written().await?.is_some()) {
            (true, true) => bail!(
                "anchor {} holds a checkpoint at its top and under {origin}'s prefix ({}): give the URL of the log \
                 to verify",
                self.url,
                fleet.url
            ),
            (false, true) => Ok(fleet),
            _ => Ok(self),
        }
    }

    /// Whether `rel` exists.
    pub async fn exists(&self, rel: &str) -> Result<bool> {
        match self.store.head(&self.path(rel)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot read {rel} from anchor {}", self.url)),
        }
    }

    /// The names directly under `rel` (`""` for the anchor's top): objects
    /// and prefixes alike, at most `limit` of them.
    pub async fn names_under(&self, rel: &str, limit: usize) -> Result<Vec<String>> {
        let dir = if rel.is_empty() { self.prefix.clone() } else { self.path(rel) };
        let listed = match self.store.list_with_delimiter(Some(&dir)).await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot list {rel} in anchor {}", self.url)),
        };
        let names = listed.common_prefixes.iter().chain(listed.objects.iter().map(|o| &o.location));
        Ok(names.filter_map(|p| p.filename().map(str::to_owned)).take(limit).collect())
    }

    /// The first entry bundle found that holds entries past `size`. Bundles
    /// are written, create-only, before the checkpoint that covers them: a
    /// checkpoint older than the bundles beside it was put back (a
    /// rollback), or its broker stopped between the two.
    pub async fn bundle_beyond(&self, size: u64) -> Result<Option<String>> {
        let (index, width) = (size / TILE_WIDTH, size % TILE_WIDTH);
        let full = tiles::bundle_path(index, TILE_WIDTH);
        if self.exists(&full).await? {
            return Ok(Some(full));
        }
        let partials = self.names_under(&format!("{full}.p"), 256).await?;
        Ok(partials
            .iter()
            .filter_map(|w| w.parse::<u64>().ok())
            .find(|w| *w > width)
            .map(|w| tiles::bundle_path(index, w)))
    }

    /// Where this anchor is, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// When the checkpoint was last written, as the object store tells
    /// (not signed: it shows whether the broker still publishes, nothing
    /// about what it published); `None` if there is no checkpoint.
    pub async fn checkpoint_written(&self) -> Result<Option<std::time::SystemTime>> {
        match self.store.head(&self.path("checkpoint")).await {
            Ok(meta) => Ok(Some(meta.last_modified.into())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read the checkpoint of anchor {}", self.url)),
        }
    }

    /// Where `rel` is on this machine, for an anchor that is a directory.
    fn local_file(&self, rel: &str) -> Option<std::path::PathBuf> {
        let url = url::Url::parse(&self.url).ok().filter(|u| u.scheme() == "file")?;
        Some(url.to_file_path().ok()?.join(rel))
    }

    fn path(&self, rel: &str) -> Path {
        rel.split('/').fold(self.prefix.clone(), |p, part| p.join(part))
    }

    /// Reads one object. Nothing the log publishes is larger than a full
    /// entry bundle, so a larger object (a writer of the anchor filling it,
    /// or a sparse file) is refused by its size before a byte is read.
    pub async fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        // A FIFO or a device in a local anchor would block the read (or
        // never end it): only regular files, not followed through links.
        if let Some(path) = self.local_file(rel) {
            match std::fs::symlink_metadata(&path) {
                Ok(m) if !m.is_file() => {
                    bail!("{rel} in anchor {} is not a regular file; the anchor was tampered with", self.url)
                }
                _ => {}
            }
        }
        match self.store.get(&self.path(rel)).await {
            Ok(r) if r.meta.size > MAX_OBJECT_BYTES => anyhow::bail!(
                "{rel} in anchor {} is {} bytes, more than any object a Grantline log publishes ({MAX_OBJECT_BYTES}); \
                 the anchor was tampered with",
                self.url,
                r.meta.size
            ),
            Ok(r) => {
                let bytes = r.bytes().await?;
                // The size the store announced is what was read, or it is refused.
                if bytes.len() as u64 > MAX_OBJECT_BYTES {
                    anyhow::bail!("{rel} in anchor {} grew past {MAX_OBJECT_BYTES} bytes while read", self.url);
                }
                Ok(Some(bytes.to_vec()))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {rel} from anchor {}", self.url)),
        }
    }

    /// Writes an immutable object once. Finding it already there with the
    /// same bytes is fine (a publish repeated after a crash); different bytes
    /// mean the anchor disagrees with this log, which is refused loudly.
    async fn create(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        let opts = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        match self.store.put_opts(&self.path(rel), PutPayload::from(bytes.clone()), opts).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => match self.get(rel).await? {
                Some(existing) if existing == bytes => Ok(()),
                _ => bail!(
                    "anchor {} already holds a different {rel}: it was written by another log or tampered with",
                    self.url
                ),
            },
            Err(e) => Err(e).with_context(|| format!("cannot write {rel} to anchor {}", self.url)),
        }
    }

    async fn put_checkpoint(&self, note: &str) -> Result<()> {
        self.store
            .put(&self.path("checkpoint"), PutPayload::from(note.as_bytes().to_vec()))
            .await
            .with_context(|| format!("cannot write the checkpoint to anchor {}", self.url))?;
        Ok(())
    }

    /// The size of this log's checkpoint the anchor holds (0 if none). A
    /// checkpoint that none of `keys` (the log's key history) signed is
    /// another log's (an origin used again with a new key, a wrong
    /// anchor): an error, so that it is never overwritten.
    pub async fn published_size(&self, keys: &[VerifierKey]) -> Result<u64> {
        match self.get("checkpoint").await? {
            None => Ok(0),
            Some(b) => {
                let note = String::from_utf8(b).context("the anchor's checkpoint is not text")?;
                Checkpoint::open_any(&note, keys).map(|cp| cp.size).map_err(|e| {
                    anyhow::anyhow!(
                        "anchor {} holds a checkpoint this log's keys did not sign ({e}): another log is published \
                         there (an origin used again with a new key?); not overwriting it: move it aside, or give \
                         this broker another anchor or origin",
                        self.url
                    )
                })
            }
        }
    }

    /// Publishes what a tree of `new` leaves adds to one of `old` leaves, then
    /// the checkpoint `note` for it.
    pub async fn publish(&self, db: &FsPath, old: u64, new: u64, note: &str) -> Result<()> {
        let (bundles, tile_data) = {
            let store = AuditStore::open_read_only(db)?;
            let mut bundles = Vec::new();
            for t in tiles::new_tiles(0, old, new) {
                let start = t.index * TILE_WIDTH;
                let entries = store.entries_range(start, start + t.width)?;
                bundles.push((tiles::bundle_path(t.index, t.width), tiles::bundle_bytes(&entries)?));
            }
            let mut tile_data = Vec::new();
            for level in 0..tiles::levels(new) {
                for TileRef { level, index, width } in tiles::new_tiles(level, old, new) {
                    let hashes =
                        store.nodes_range(level * TILE_HEIGHT, index * TILE_WIDTH, index * TILE_WIDTH + width)?;
                    tile_data.push((tiles::tile_path(level, index, width), tiles::tile_bytes(&hashes)));
                }
            }
            (bundles, tile_data)
        };
        for (path, bytes) in bundles.into_iter().chain(tile_data) {
            self.create(&path, bytes).await?;
        }
        self.put_checkpoint(note).await
    }
}

/// Checks an anchor's location and access without opening it (nothing is
/// created or contacted): the URL, its scheme, the options file, and that a
/// cloud anchor has credentials or asks for the instance's.
pub fn check(location: &str, access: &Access) -> Result<()> {
    if location.contains("://") {
        checked_options(&parse_url(location)?, access)?;
    } else {
        refuse_url_like(location)?;
    }
    Ok(())
}

/// A location that starts like a URL (`s3:/bucket`) but is not one would be
/// taken for a local directory, and the log would never leave the host.
fn refuse_url_like(location: &str) -> Result<()> {
    let scheme = location.split_once(':').map(|(s, _)| s).filter(|s| {
        s.len() > 1
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b))
    });
    if let Some(scheme) = scheme {
        bail!("anchor {location:?} looks like a {scheme} URL but is not one: write {scheme}://…, or give a directory path");
    }
    Ok(())
}

fn parse_url(location: &str) -> Result<url::Url> {
    url::Url::parse(location).with_context(|| format!("anchor {location:?} is not a URL"))
}

/// The object_store options of `url`, once its scheme and credentials pass.
fn checked_options(url: &url::Url, access: &Access) -> Result<Vec<(String, String)>> {
    let (scheme, _) = ObjectStoreScheme::parse(url)
        .map_err(|_| anyhow::anyhow!("anchor {url} has an unsupported scheme; the schemes are file, s3, gs and az"))?;
    let mut options = access.options()?;
    access::check(scheme, url, &options, access.instance_credentials)?;
    if !access.instance_credentials {
        options.extend(access::NO_METADATA.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    }
    Ok(options)
}

/// The prefix of a broker's log in a shared anchor: its origin with every
/// byte outside `[A-Za-z0-9.-]` (and a leading dot) written `_xx` in hex,
/// so that it is one path segment on every object store and no two origins
/// share one (`grantline/broker-a` is `grantline_2fbroker-a`).
pub fn origin_segment(origin: &str) -> String {
    let mut out = String::with_capacity(origin.len());
    for (i, b) in origin.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || (b == b'.' && i > 0) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    // A file name holds 255 bytes: a long origin is named by its hash
    // (`_h` cannot start an escape, whose two digits are hex).
    if out.len() > MAX_SEGMENT {
        return format!("_h{}", hex::encode(grantline_proto::audit::entry::leaf_hash(origin.as_bytes())));
    }
    out
}

/// The longest origin prefix written out; longer ones are hashed.
const MAX_SEGMENT: usize = 160;

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
            match anchor.published_size(&keys).await {
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
                "anchor {} holds a checkpoint of {} entries, this log has {}: was the state directory restored \
                 from a backup? Nothing is published until the log grows past it (its entries must then agree)",
                anchor.url,
                *published,
                cp.size
            ),
            "the anchor is ahead of the log",
        ),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "the writer's checkpoint does not verify"),
    }
}

#[cfg(test)]
mod tests;
