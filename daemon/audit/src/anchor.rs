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
    /// The directory, for an anchor on this machine: read without
    /// object_store (see [`Anchor::get`]).
    local: Option<std::path::PathBuf>,
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
        let local = url.to_file_path().ok().filter(|_| url.scheme() == "file");
        Ok(Self { store: Arc::from(store), prefix, url: url.to_string(), local })
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
            local: self.local.as_ref().map(|d| d.join(segment)),
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
        Ok(self.head(rel).await?.is_some())
    }

    /// What the store tells of `rel`, if it exists.
    async fn head(&self, rel: &str) -> Result<Option<object_store::ObjectMeta>> {
        match self.store.head(&self.path(rel)).await {
            Ok(meta) => Ok(Some(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
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
        use tokio_stream::StreamExt;
        let (index, width) = (size / TILE_WIDTH, size % TILE_WIDTH);
        let full = tiles::bundle_path(index, TILE_WIDTH);
        if self.exists(&full).await? {
            return Ok(Some(full));
        }
        // Every name under `<index>.p/` is read (a real log has at most 255
        // there): anything but a partial bundle is tampering, and cannot
        // hide one by filling a listing.
        let dir = format!("{full}.p");
        let base = self.path(&dir);
        let mut listed = self.store.list(Some(&base));
        let mut seen = 0usize;
        while let Some(meta) = listed.next().await {
            let meta = match meta {
                Ok(m) => m,
                Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => return Err(e).with_context(|| format!("cannot list {dir} in anchor {}", self.url)),
            };
            seen += 1;
            let rel: Vec<_> = meta.location.prefix_match(&base).map(|parts| parts.collect()).unwrap_or_default();
            let w = match &rel[..] {
                [one] => one.as_ref().parse::<u64>().ok().filter(|w| (1..TILE_WIDTH).contains(w)),
                _ => None,
            };
            match w {
                Some(w) if w > width => return Ok(Some(tiles::bundle_path(index, w))),
                Some(_) if seen < MAX_PARTIALS => {}
                _ => bail!(
                    "anchor {} holds {} under {dir}, which no log publishes: the anchor was tampered with",
                    self.url,
                    meta.location
                ),
            }
        }
        Ok(None)
    }

    /// Where this anchor is, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// When the checkpoint was last written, as the object store tells
    /// (not signed: it shows whether the broker still publishes, nothing
    /// about what it published); `None` if there is no checkpoint.
    pub async fn checkpoint_written(&self) -> Result<Option<std::time::SystemTime>> {
        Ok(self.head("checkpoint").await?.map(|meta| meta.last_modified.into()))
    }

    fn path(&self, rel: &str) -> Path {
        rel.split('/').fold(self.prefix.clone(), |p, part| p.join(part))
    }

    /// Reads one object. Nothing the log publishes is larger than a full
    /// entry bundle, so a larger object (a writer of the anchor filling it,
    /// or a sparse file) is refused by its size before a byte is read.
    pub async fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        // A local anchor is read here: opened without blocking (a FIFO in
        // it would block the reader for ever), and only a regular file, no
        // larger than the bound, is read.
        if let Some(dir) = &self.local {
            return match grantline_proto::files::read_bounded_bytes(&dir.join(rel), MAX_OBJECT_BYTES) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e)
                    .with_context(|| format!("{rel} in anchor {} cannot be read; was it tampered with?", self.url)),
            };
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

    pub(crate) async fn put_checkpoint(&self, note: &str) -> Result<()> {
        self.store
            .put(&self.path("checkpoint"), PutPayload::from(note.as_bytes().to_vec()))
            .await
            .with_context(|| format!("cannot write the checkpoint to anchor {}", self.url))?;
        Ok(())
    }

    /// The size of this log's checkpoint the anchor holds (0 if none). A
    /// checkpoint that none of `keys` (the log's key history) signed is
    /// another log's (an origin used again with a new key, a wrong
    /// anchor), and one that the log's database `db` did not sign is of
    /// another copy of it (a state directory restored from a backup): both
    /// are errors, so that neither is overwritten nor forked.
    pub async fn published_size(&self, keys: &[VerifierKey], db: &FsPath) -> Result<u64> {
        let Some(b) = self.get("checkpoint").await? else { return Ok(0) };
        let note = String::from_utf8(b).context("the anchor's checkpoint is not text")?;
        let cp = Checkpoint::open_any(&note, keys).map_err(|e| {
            anyhow::anyhow!(
                "anchor {} holds a checkpoint this log's keys did not sign ({e}): another log is published there \
                 (an origin used again with a new key?); not overwriting it: move it aside, or give this broker \
                 another anchor or origin",
                self.url
            )
        })?;
        let store = AuditStore::open_read_only(db)?;
        let signed = store.checkpoints_after(cp.size.checked_sub(1), 1)?;
        let ours = signed.first().is_some_and(|(size, ours)| {
            *size == cp.size && Checkpoint::open_any(ours, keys).is_ok_and(|c| c.root == cp.root)
        });
        if !ours {
            bail!(
                "anchor {} holds a checkpoint of {} entries that this log's database never signed (a state \
                 directory restored from a backup?): not publishing, so as not to fork the published log; restore \
                 the database that signed it, or move the anchor's copy aside",
                self.url,
                cp.size
            );
        }
        Ok(cp.size)
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

/// Names read under one index's partial bundles before the rest is
/// taken for tampering (a log writes at most 255 there).
const MAX_PARTIALS: usize = 512;

/// The longest origin prefix written out; longer ones are hashed.
const MAX_SEGMENT: usize = 160;

#[cfg(test)]
mod tests;
