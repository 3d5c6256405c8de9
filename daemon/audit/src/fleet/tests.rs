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
