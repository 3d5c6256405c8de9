use super::batch::{BUSY_BATCH, COMMIT_WINDOW};
use super::*;
use grantline_proto::audit::event::CallerInfo;

/// Review defect 2 at the writer: an event too large even once cut to its
/// field bounds is refused alone; the chain does not move, later events
/// are recorded, and the log verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_event_is_refused_without_poisoning_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let key = SignerKey::generate("t.example/log").unwrap();
    let vkey = key.verifier().clone();
    let (log, writer) = AuditLog::start(&db, key, "test").unwrap();
    let admin = CallerInfo { uid: 0, gid: 0, pid: 1, exe: String::new(), unit: String::new() };
    // 64 labels of 1 KiB keys and values: each field within its bound,
    // the entry over 64 KiB.
    let labels = (0..64).map(|i| (format!("{i:04}{}", "k".repeat(1000)), "v".repeat(1000))).collect();
    let huge = Event::TokenCreation { token_id: "t".into(), node: String::new(), labels, expires_at: 0, admin };
    assert!(matches!(log.append(huge).await, Err(AuditError::TooLarge(_))));
    let small = Event::Denial {
        action: "grant".into(),
        node: "n".into(),
        kind: "x509".into(),
        role: "r".repeat(40_000),
        policy: String::new(),
        reason: "too long a role".into(),
        caller: None,
    };
    let receipt = log.append(small).await.unwrap();
    assert_eq!(Entry::decode(&receipt.entry).unwrap().seq, 1, "the refused event took no seq");
    assert_eq!(stop_and_verify(log, writer, &db, vkey), 2);
}

/// Stops the writer and verifies the whole chain in `db`: its entry count.
fn stop_and_verify(log: AuditLog, writer: JoinHandle<()>, db: &Path, vkey: grantline_proto::audit::VerifierKey) -> u64 {
    drop(log);
    writer.join().unwrap();
    let store = AuditStore::open_read_only(db).unwrap();
    let mut v = grantline_proto::audit::ChainVerifier::new(vkey);
    store.for_each(|row| v.push(row)).unwrap().unwrap();
    v.finish().unwrap().entries
}

/// CI: a log copied as `audit.db` alone after a clean stop had no
/// tables when a reader (the anchor publisher, a proof) was still open
/// as the writer closed: SQLite folds the WAL only on the last close,
/// and a read-only connection never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanly_stopped_log_is_whole_in_its_main_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let key = SignerKey::generate("t.example/log").unwrap();
    let (log, writer) = AuditLog::start(&db, key, "test").unwrap();
    let admin = CallerInfo { uid: 0, gid: 0, pid: 1, exe: String::new(), unit: String::new() };
    let event = Event::TokenCreation {
        token_id: "t".into(),
        node: String::new(),
        labels: Default::default(),
        expires_at: 0,
        admin,
    };
    log.append(event).await.unwrap();
    let reader = AuditStore::open_read_only(&db).unwrap();
    assert!(reader.count().unwrap() >= 2);
    drop(log);
    writer.join().unwrap();
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(&db, copy.path().join("audit.db")).unwrap();
    drop(reader);
    let copied = AuditStore::open_read_only(&copy.path().join("audit.db")).unwrap();
    assert_eq!(copied.count().unwrap(), 2, "the main file lacks what the WAL held");
}

/// Group commit: a writer committing one entry at a time never waits;
/// one whose last batch showed appends arriving concurrently lets the next
/// batch gather for the window, and no longer than it — unless it sat idle
/// for a window since (review: one burst made every later lone append
/// wait), or a full batch already waits.
#[test]
fn only_a_busy_writer_lets_a_batch_gather() {
    let busy_idle = Duration::from_micros(200);
    for lone in 0..BUSY_BATCH {
        assert_eq!(commit_window(lone, busy_idle, 0), None, "a batch of {lone} must not delay the next");
    }
    for busy in [BUSY_BATCH, BUSY_BATCH + 1, MAX_BATCH] {
        assert_eq!(commit_window(busy, busy_idle, 0), Some(COMMIT_WINDOW));
        assert_eq!(commit_window(busy, busy_idle, MAX_BATCH / 2), Some(COMMIT_WINDOW));
    }
    for idle in [COMMIT_WINDOW, Duration::from_secs(3600)] {
        assert_eq!(commit_window(MAX_BATCH, idle, 0), None, "a writer idle for {idle:?} is not busy");
    }
    for full in [MAX_BATCH - 1, MAX_BATCH, QUEUE] {
        assert_eq!(commit_window(MAX_BATCH, busy_idle, full), None, "{full} queued fill a batch already");
    }
    assert!(COMMIT_WINDOW <= Duration::from_millis(5), "the window is latency every busy grant pays");
}

/// Appends from many tasks at once, gathered in windows: each gets its own
/// seq, none is lost or recorded twice, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_gathered_in_windows_are_all_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let key = SignerKey::generate("t.example/log").unwrap();
    let vkey = key.verifier().clone();
    let (log, writer) = AuditLog::start(&db, key, "test").unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..16 {
        let log = log.clone();
        tasks.spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                let event = Event::Denial {
                    action: "grant".into(),
                    node: format!("n{t}"),
                    kind: "x509".into(),
                    role: format!("r{i}"),
                    policy: String::new(),
                    reason: "test".into(),
                    caller: None,
                };
                let receipt = log.append(event).await.unwrap();
                seqs.push(Entry::decode(&receipt.entry).unwrap().seq);
            }
            seqs
        });
    }
    let mut seqs: Vec<u64> = tasks.join_all().await.into_iter().flatten().collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
    assert_eq!(stop_and_verify(log, writer, &db, vkey), 401);
}
