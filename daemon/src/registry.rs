//! The broker's node registry: every enrolled node's record, the live
//! connections of each, and when each was last heard from (not yet saved).
//! The handler, the admin API and revocation go through its methods; its
//! locks are its own and never held across an await.
//!
//! Revocation is monotonic here as in `state.db`: once a record is revoked,
//! nothing in this type clears the flag.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError, RwLock};

use crate::state::NodeRecord;

/// Why a node may not use an identity, as the registry sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Revoked,
    NotEnrolled,
    /// The identity was replaced by a renewal that has been used, or by a
    /// re-enrollment.
    Replaced,
}

/// What `admit` decided for a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    Yes,
    /// Yes, and the first connection with the node's current identity: from
    /// now on only it renews (the caller tells the store, for a fleet).
    FirstUse,
    /// Refused for the node's standing.
    Refused(Refusal),
    /// The node already holds this many connections.
    TooMany(usize),
}

/// What `sync` did with a record from the fleet's change feed.
#[derive(Debug, PartialEq, Eq)]
pub enum Synced<C> {
    /// Nothing new (an older or equal version, or a revoked node).
    Unchanged,
    /// The record was taken (an enrollment or renewal at another broker).
    Updated,
    /// The node was revoked elsewhere: its live connections here, to close.
    Revoked(Vec<C>),
}

/// Connections one node may hold at once (an agent needs one; a few more
/// cover reconnects racing the old connection's close).
pub const MAX_CONNECTIONS_PER_NODE: usize = 8;

/// Nodes, live connections (of type `C`) and last-seen times.
pub struct Registry<C> {
    nodes: RwLock<HashMap<String, NodeRecord>>,
    /// A node's live connections by id: at most a few, so a vector (a
    /// map per node cost each connected agent ~100 bytes more; RFD 0008).
    live: Mutex<HashMap<String, Vec<(usize, C)>>>,
    seen: Mutex<HashMap<String, i64>>,
}

/// An enrolled node as the admin API lists it.
pub struct Listed {
    pub record: NodeRecord,
    pub connected: bool,
}

impl<C: Clone> Registry<C> {
    /// A registry of the nodes `state.db` holds.
    pub fn new(nodes: Vec<NodeRecord>) -> Self {
        Self {
            nodes: RwLock::new(nodes.into_iter().map(|n| (n.name.clone(), n)).collect()),
            live: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Reads the record of `name` (None if not enrolled) without copying it.
    pub fn with<T>(&self, name: &str, f: impl FnOnce(Option<&NodeRecord>) -> T) -> T {
        f(self.nodes.read().unwrap_or_else(PoisonError::into_inner).get(name))
    }

    /// Whether `serial` may speak for `name`: enrolled, not revoked, and
    /// the identity is its own.
    pub fn standing(&self, name: &str, serial: &str) -> Result<(), Refusal> {
        self.speaker(name, serial, |_| ())
    }

    /// `read` of the record `serial` speaks for, or why it speaks for none.
    pub fn speaker<T>(&self, name: &str, serial: &str, read: impl FnOnce(&NodeRecord) -> T) -> Result<T, Refusal> {
        self.with(name, |n| match n {
            None => Err(Refusal::NotEnrolled),
            Some(n) if n.revoked => Err(Refusal::Revoked),
            Some(n) if !n.speaks_for(serial) => Err(Refusal::Replaced),
            Some(n) => Ok(read(n)),
        })
    }

    /// True when `name` is revoked or not enrolled (any longer).
    pub fn is_out(&self, name: &str) -> bool {
        self.with(name, |n| n.is_none_or(|n| n.revoked))
    }

    /// Puts `record` in place of the node's, unless the node is revoked:
    /// then nothing changes and false is returned.
    pub fn record(&self, record: NodeRecord) -> bool {
        let mut nodes = self.nodes.write().unwrap_or_else(PoisonError::into_inner);
        match nodes.get(&record.name) {
            Some(n) if n.revoked => return false,
            // The fleet's feed already brought a newer record: keep it.
            Some(n) if record.version != 0 && n.version > record.version => return true,
            _ => {}
        }
        nodes.insert(record.name.clone(), record);
        true
    }

    /// Takes a record as the fleet's store now holds it: a revocation is
    /// applied (and the node's connections here handed back to close), a
    /// newer identity replaces the one held, an older copy changes nothing.
    pub fn sync(&self, incoming: NodeRecord) -> Synced<C> {
        let mut nodes = self.nodes.write().unwrap_or_else(PoisonError::into_inner);
        let held = nodes.get(&incoming.name);
        if held.is_some_and(|n| n.revoked) {
            return Synced::Unchanged;
        }
        if incoming.revoked {
            let name = incoming.name.clone();
            nodes.insert(name.clone(), incoming);
            drop(nodes);
            let conns = self.live.lock().unwrap_or_else(PoisonError::into_inner).remove(&name).unwrap_or_default();
            return Synced::Revoked(conns.into_iter().map(|(_, c)| c).collect());
        }
        let mut incoming = incoming;
        if let Some(n) = held {
            if n.version >= incoming.version {
                return Synced::Unchanged;
            }
            // Used here, or (as the fleet's store says) anywhere.
            incoming.current_seen |= n.serial == incoming.serial && n.current_seen;
            incoming.last_seen = incoming.last_seen.max(n.last_seen);
        }
        nodes.insert(incoming.name.clone(), incoming);
        Synced::Updated
    }

    /// Marks `name` revoked at `at` and takes its live connections, for the
    /// caller to close. A connection registering after this sees the flag.
    pub fn revoke(&self, name: &str, at: i64) -> Vec<C> {
        if let Some(n) = self.nodes.write().unwrap_or_else(PoisonError::into_inner).get_mut(name) {
            n.revoked = true;
            n.revoked_at = at;
        }
        let conns = self.live.lock().unwrap_or_else(PoisonError::into_inner).remove(name).unwrap_or_default();
        conns.into_iter().map(|(_, c)| c).collect()
    }

    /// Registers connection `id` of `name` presenting `serial`, then says
    /// whether it may stay; a node in good standing was seen at `now`.
    /// Registered before the node's standing is read, so a concurrent
    /// `revoke` either takes the connection or is seen. The first
    /// connection with a renewed identity marks it used.
    pub fn admit(&self, name: &str, serial: &str, id: usize, conn: C, now: i64) -> Admitted {
        let held = {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            let conns = live.entry(name.to_owned()).or_default();
            conns.retain(|(held, _)| *held != id);
            conns.push((id, conn));
            conns.len()
        };
        match self.standing(name, serial) {
            Ok(()) => {
                // Only an identity that may stay counts as the node being
                // heard from: a revoked or replaced one retrying does not.
                self.mark_seen(name, now);
                if held > MAX_CONNECTIONS_PER_NODE {
                    return Admitted::TooMany(MAX_CONNECTIONS_PER_NODE);
                }
                let mut nodes = self.nodes.write().unwrap_or_else(PoisonError::into_inner);
                match nodes.get_mut(name).filter(|n| n.serial == serial && !n.current_seen) {
                    Some(n) => {
                        n.current_seen = true;
                        Admitted::FirstUse
                    }
                    None => Admitted::Yes,
                }
            }
            Err(refusal) => Admitted::Refused(refusal),
        }
    }

    /// Forgets connection `id` of `name`, noting `seen_at` as when the node
    /// was last heard from (None for a connection that was refused).
    pub fn leave(&self, name: &str, id: usize, seen_at: Option<i64>) {
        {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(conns) = live.get_mut(name) {
                conns.retain(|(held, _)| *held != id);
                if conns.is_empty() {
                    live.remove(name);
                }
            }
        }
        if let Some(at) = seen_at {
            self.mark_seen(name, at);
        }
    }

    /// Notes that `name` was heard from at `at`.
    pub fn mark_seen(&self, name: &str, at: i64) {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).insert(name.to_owned(), at);
    }

    /// Takes the last-seen times noted since the last call, and keeps them
    /// in the records, for the caller to save.
    pub fn take_seen(&self) -> Vec<(String, i64)> {
        let seen: Vec<(String, i64)> = self.seen.lock().unwrap_or_else(PoisonError::into_inner).drain().collect();
        if !seen.is_empty() {
            let mut nodes = self.nodes.write().unwrap_or_else(PoisonError::into_inner);
            for (name, at) in &seen {
                if let Some(n) = nodes.get_mut(name) {
                    n.last_seen = n.last_seen.max(*at);
                }
            }
        }
        seen
    }

    /// Every enrolled node by name, whether it is connected, and when it was
    /// last seen (counting times not yet saved).
    pub fn list(&self) -> Vec<Listed> {
        let mut out: Vec<Listed> = self
            .nodes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|n| Listed { record: n.clone(), connected: false })
            .collect();
        {
            let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            for n in &mut out {
                n.connected = live.get(&n.record.name).is_some_and(|c| !c.is_empty());
                if let Some(at) = seen.get(&n.record.name) {
                    n.record.last_seen = n.record.last_seen.max(*at);
                }
            }
        }
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        out
    }

    /// Takes back a first use that could not be recorded in the fleet's
    /// store: the next connection with `serial` tries again.
    pub fn unmark_current_seen(&self, name: &str, serial: &str) {
        if let Some(n) = self.nodes.write().unwrap_or_else(PoisonError::into_inner).get_mut(name) {
            if n.serial == serial {
                n.current_seen = false;
            }
        }
    }

    /// Every live connection (to close them all).
    pub fn connections(&self) -> Vec<C> {
        self.live
            .lock()
            .map(|l| l.values().flat_map(|c| c.iter().map(|(_, c)| c.clone())).collect())
            .unwrap_or_default()
    }

    /// The names of the nodes that hold at least one connection.
    pub fn connected_names(&self) -> std::collections::HashSet<String> {
        self.live.lock().map(|l| l.keys().cloned().collect()).unwrap_or_default()
    }

    /// How many nodes hold at least one connection.
    pub fn connected_nodes(&self) -> usize {
        self.live.lock().map_or(0, |l| l.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, serial: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            labels: Default::default(),
            serial: serial.into(),
            previous_serial: String::new(),
            current_seen: false,
            not_after: i64::MAX,
            revoked: false,
            revoked_at: 0,
            last_seen: 0,
            version: 0,
        }
    }

    #[test]
    fn a_revocation_is_never_undone_by_a_later_record() {
        let r: Registry<u8> = Registry::new(vec![node("web-1", "01")]);
        assert_eq!(r.admit("web-1", "01", 1, 7, 10), Admitted::FirstUse);
        assert_eq!(r.revoke("web-1", 20), vec![7], "the live connection is handed back to be closed");
        assert!(!r.record(node("web-1", "02")), "a renewal in flight must not clear the flag");
        assert_eq!(r.standing("web-1", "02"), Err(Refusal::Revoked));
        assert_eq!(r.admit("web-1", "01", 2, 8, 30), Admitted::Refused(Refusal::Revoked));
        assert!(r.is_out("web-1") && r.is_out("never-enrolled"));
    }

    #[test]
    fn connections_are_counted_per_node_and_identities_checked() {
        let r: Registry<u8> = Registry::new(vec![node("a", "01")]);
        assert_eq!(r.admit("a", "01", 0, 0, 1), Admitted::FirstUse, "the first use is told once");
        for id in 1..MAX_CONNECTIONS_PER_NODE {
            assert_eq!(r.admit("a", "01", id, 0, 1), Admitted::Yes);
        }
        assert_eq!(r.admit("a", "01", 99, 0, 1), Admitted::TooMany(MAX_CONNECTIONS_PER_NODE));
        assert_eq!(r.admit("a", "02", 100, 0, 1), Admitted::Refused(Refusal::Replaced));
        assert_eq!(r.admit("b", "01", 101, 0, 1), Admitted::Refused(Refusal::NotEnrolled));
        assert_eq!(r.connected_nodes(), 2, "refused connections stay registered until they leave");
        for id in (0..MAX_CONNECTIONS_PER_NODE).chain([99, 100]) {
            r.leave("a", id, Some(5));
        }
        r.leave("b", 101, None);
        assert_eq!(r.connected_nodes(), 0);
        assert!(r.with("a", |n| n.is_some_and(|n| n.current_seen)), "the identity was used");
    }

    /// Review finding: a revoked or replaced identity that keeps
    /// reconnecting made its node look alive (`nodes list` showed each
    /// refused attempt as last seen).
    #[test]
    fn refused_connections_do_not_count_as_seen() {
        let mut revoked = node("gone", "01");
        revoked.revoked = true;
        let r: Registry<u8> = Registry::new(vec![revoked, node("a", "02")]);
        assert_eq!(r.admit("gone", "01", 1, 0, 100), Admitted::Refused(Refusal::Revoked));
        assert_eq!(r.admit("a", "01", 2, 0, 100), Admitted::Refused(Refusal::Replaced));
        r.leave("gone", 1, None);
        r.leave("a", 2, None);
        assert!(r.list().iter().all(|l| l.record.last_seen == 0), "refused attempts were counted as seen");
        assert!(r.take_seen().is_empty());
        assert_eq!(r.admit("a", "02", 3, 0, 150), Admitted::FirstUse);
        r.leave("a", 3, Some(160));
        assert_eq!(r.take_seen(), vec![("a".to_owned(), 160)]);
    }

    #[test]
    fn fleet_changes_apply_in_version_order_and_revocations_close_connections() {
        let mut held = node("a", "01");
        held.version = 5;
        let r: Registry<u8> = Registry::new(vec![held]);
        assert_eq!(r.admit("a", "01", 1, 9, 10), Admitted::FirstUse);
        let mut older = node("a", "00");
        older.version = 4;
        assert_eq!(r.sync(older), Synced::Unchanged, "an older copy must not replace a newer record");
        let mut renewed = node("a", "02");
        renewed.version = 6;
        renewed.previous_serial = "01".into();
        assert_eq!(r.sync(renewed), Synced::Updated);
        assert_eq!(r.standing("a", "02"), Ok(()));
        assert!(r.with("a", |n| n.is_some_and(|n| !n.current_seen)), "the renewed identity was not used yet");
        let mut used_elsewhere = node("a", "02");
        (used_elsewhere.version, used_elsewhere.previous_serial, used_elsewhere.current_seen) = (7, "01".into(), true);
        assert_eq!(r.sync(used_elsewhere), Synced::Updated);
        assert!(r.with("a", |n| n.is_some_and(|n| n.current_seen)), "used at another broker counts here");
        let mut stale = node("a", "09");
        stale.version = 6;
        assert!(r.record(stale), "a local write older than the feed's record is not an error");
        assert_eq!(r.standing("a", "02"), Ok(()), "but it does not replace the newer record");
        let mut revoked = node("a", "02");
        (revoked.version, revoked.revoked, revoked.revoked_at) = (8, true, 30);
        assert_eq!(r.sync(revoked), Synced::Revoked(vec![9]));
        let mut undo = node("a", "03");
        undo.version = 9;
        assert_eq!(r.sync(undo), Synced::Unchanged, "nothing from the feed undoes a revocation");
        assert_eq!(r.standing("a", "03"), Err(Refusal::Revoked));
        let mut elsewhere = node("b", "01");
        elsewhere.version = 1;
        assert_eq!(r.sync(elsewhere), Synced::Updated, "a node enrolled at another broker is known here");
        assert_eq!(r.admit("b", "01", 2, 0, 40), Admitted::FirstUse);
    }

    #[test]
    fn last_seen_times_are_taken_once_and_kept_in_the_records() {
        let r: Registry<u8> = Registry::new(vec![node("a", "01")]);
        r.mark_seen("a", 40);
        r.mark_seen("gone", 41);
        assert_eq!(r.list()[0].record.last_seen, 40, "listed before it is saved");
        let mut taken = r.take_seen();
        taken.sort();
        assert_eq!(taken, vec![("a".to_owned(), 40), ("gone".to_owned(), 41)]);
        assert!(r.take_seen().is_empty());
        assert!(r.with("a", |n| n.is_some_and(|n| n.last_seen == 40)));
    }
}
