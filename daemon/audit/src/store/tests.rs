use super::*;
use crate::AuditReaders;

#[test]
fn readers_serve_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let mut s = AuditStore::open(&path).unwrap();
    s.append(&[NewEntry { seq: 0, hash: [1; 32], entry: b"e".to_vec(), signature: [2; 64] }], &[(0, 0, [1; 32])])
        .unwrap();
    let readers = AuditReaders::open(&path, 2).unwrap();
    // A read while another is under way takes the other connection
    // (with one connection this would wait for itself).
    let counts = readers.with(|a| (a.count().unwrap(), readers.with(|b| b.count().unwrap())));
    assert_eq!(counts, (1, 1));
    assert!(AuditReaders::open(&dir.path().join("missing/a.db"), 2).is_err());
}

#[test]
fn rows_cannot_be_updated_or_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = AuditStore::open(&dir.path().join("a.db")).unwrap();
    s.append(&[NewEntry { seq: 0, hash: [1; 32], entry: b"e".to_vec(), signature: [2; 64] }], &[(0, 0, [1; 32])])
        .unwrap();
    let upd = s.conn.execute("UPDATE entries SET entry = x'00'", []).unwrap_err().to_string();
    assert!(upd.contains("append-only"), "{upd}");
    let del = s.conn.execute("DELETE FROM entries", []).unwrap_err().to_string();
    assert!(del.contains("append-only"), "{del}");
    assert_eq!(s.count().unwrap(), 1);
    // A duplicate seq is refused and leaves nothing half-written.
    let dup = [
        NewEntry { seq: 1, hash: [1; 32], entry: b"f".to_vec(), signature: [2; 64] },
        NewEntry { seq: 0, hash: [1; 32], entry: b"g".to_vec(), signature: [2; 64] },
    ];
    assert!(s.append(&dup, &[]).is_err());
    let node = s.conn.execute("UPDATE tree_nodes SET hash = x'00'", []).unwrap_err().to_string();
    assert!(node.contains("append-only"), "{node}");
    s.add_checkpoint(1, 0, "note").unwrap();
    assert!(s.conn.execute("DELETE FROM checkpoints", []).is_err());
    assert_eq!(s.count().unwrap(), 1);
}
