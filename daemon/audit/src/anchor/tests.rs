//! The anchor's own checks, on local directories.
use super::*;

/// An anchor object larger than anything a log publishes (here a sparse
/// 8 GiB checkpoint, which takes no disk) is refused by its size, before
/// the verifier reads it into memory.
#[tokio::test]
async fn an_object_larger_than_any_the_log_publishes_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("checkpoint")).unwrap().set_len(8 << 30).unwrap();
    std::fs::write(dir.path().join("small"), b"fine").unwrap();
    let anchor = Anchor::open_existing(dir.path().to_str().unwrap(), &Access::default()).unwrap();
    let err = format!("{:#}", anchor.get("checkpoint").await.unwrap_err());
    assert!(err.contains(&format!("larger than {MAX_OBJECT_BYTES} bytes")), "{err}");
    assert_eq!(anchor.get("small").await.unwrap().unwrap(), b"fine");
    assert!(anchor.get("absent").await.unwrap().is_none());
}

/// A FIFO in a local anchor would block the reader for ever.
#[tokio::test]
async fn only_regular_files_are_read_from_a_local_anchor() {
    let dir = tempfile::tempdir().unwrap();
    nix::unistd::mkfifo(&dir.path().join("checkpoint"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("link")).unwrap();
    let anchor = Anchor::open_existing(dir.path().to_str().unwrap(), &Access::default()).unwrap();
    for name in ["checkpoint", "link"] {
        let err = format!("{:#}", anchor.get(name).await.unwrap_err());
        assert!(err.contains("not a regular file"), "{err}");
    }
}

/// Bundles are published before their checkpoint: one past the
/// checkpoint's size shows an older checkpoint put back.
#[tokio::test]
async fn bundles_past_the_checkpoint_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = Anchor::open(dir.path().to_str().unwrap(), &Access::default()).unwrap();
    assert_eq!(anchor.bundle_beyond(3).await.unwrap(), None);
    for width in [3, 5] {
        anchor.create(&tiles::bundle_path(0, width), vec![0]).await.unwrap();
    }
    assert_eq!(anchor.bundle_beyond(5).await.unwrap(), None);
    assert_eq!(anchor.bundle_beyond(3).await.unwrap().as_deref(), Some("tile/entries/000.p/5"));
    anchor.create(&tiles::bundle_path(1, TILE_WIDTH), vec![0]).await.unwrap();
    assert_eq!(anchor.bundle_beyond(256).await.unwrap().as_deref(), Some("tile/entries/001"));
    // Names that no log publishes, to fill a listing and hide a bundle
    // past the checkpoint, are tampering.
    for junk in ["tile/entries/000.p/zz/x", "tile/entries/000.p/0", "tile/entries/000.p/999"] {
        let dir = tempfile::tempdir().unwrap();
        let anchor = Anchor::open(dir.path().to_str().unwrap(), &Access::default()).unwrap();
        anchor.create(junk, vec![0]).await.unwrap();
        let err = anchor.bundle_beyond(3).await.unwrap_err().to_string();
        assert!(err.contains("which no log publishes"), "{junk}: {err}");
    }
}

/// A checkpoint of another log (an origin used again with a new key), or
/// of another copy of this one (a backup restored), is not taken for this
/// log's, so it is never overwritten nor forked.
#[tokio::test]
async fn only_this_logs_own_checkpoint_is_published_over() {
    use grantline_proto::audit::SignerKey;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let anchor = Anchor::open(dir.path().join("anchor").to_str().unwrap(), &Access::default()).unwrap();
    let (old, new) = (SignerKey::generate("fleet/a").unwrap(), SignerKey::generate("fleet/a").unwrap());
    let keys = [old.verifier().clone(), new.verifier().clone()];
    let store = AuditStore::open(&db).unwrap();
    let mine = Checkpoint { origin: "fleet/a".into(), size: 7, root: [1; 32] }.sign(&old).unwrap();
    store.add_checkpoint(7, 0, &mine).unwrap();
    drop(store);
    anchor.put_checkpoint(&mine).await.unwrap();
    let err = anchor.published_size(&keys[1..], &db).await.unwrap_err().to_string();
    assert!(err.contains("not overwriting it"), "{err}");
    // The same log after a key rotation: its history has the old key.
    assert_eq!(anchor.published_size(&keys, &db).await.unwrap(), 7);
    // Signed by the log's key, but not by this database: a fork to be.
    let other = Checkpoint { origin: "fleet/a".into(), size: 7, root: [2; 32] }.sign(&old).unwrap();
    anchor.put_checkpoint(&other).await.unwrap();
    let err = anchor.published_size(&keys, &db).await.unwrap_err().to_string();
    assert!(err.contains("never signed"), "{err}");
}

/// With a log at the top and one under the origin's prefix, the anchor
/// would choose which is verified: refused.
#[tokio::test]
async fn two_candidate_logs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = Anchor::open(dir.path().to_str().unwrap(), &Access::default()).unwrap();
    anchor.for_origin("fleet/a").put_checkpoint("x\n").await.unwrap();
    assert!(anchor.clone().log_of("fleet/a").await.unwrap().url().ends_with("fleet_2fa"));
    anchor.put_checkpoint("y\n").await.unwrap();
    let err = anchor.log_of("fleet/a").await.unwrap_err().to_string();
    assert!(err.contains("give the URL of the log"), "{err}");
}

#[test]
fn a_location_that_only_looks_like_a_url_is_refused() {
    for bad in ["s3:/bucket/fleet", "gs:bucket", "file:/tmp/x"] {
        let err = check(bad, &Access::default()).unwrap_err().to_string();
        assert!(err.contains("is not one"), "{err}");
    }
    check("/var/lib/grantline/anchor", &Access::default()).unwrap();
    check("relative/anchor", &Access::default()).unwrap();
}

#[test]
fn each_origin_is_one_segment_of_its_own() {
    assert_eq!(origin_segment("grantline/broker-a"), "grantline_2fbroker-a");
    assert_eq!(origin_segment("a_2fb"), "a_5f2fb");
    assert_eq!(origin_segment(".."), "_2e.");
    assert_eq!(origin_segment("log.example.com"), "log.example.com");
    let long = "a/".repeat(100);
    assert!(origin_segment(&long).starts_with("_h") && origin_segment(&long).len() == 66, "{long}");
    let seg = origin_segment("x/../%2F\\y");
    assert!(seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)), "{seg}");
}
