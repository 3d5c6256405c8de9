mod checkpoint_tests {
    use grantline_proto::audit::{Event, SignerKey};

    use super::super::*;
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
