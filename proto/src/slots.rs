//! Counted slots: connections held by each key (a uid, a source address)
//! and in all, each under its cap, given back when the slot is dropped.
//! What the agent's local socket and the broker's anonymous connections
//! bound their callers with (RFD 0009).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

pub struct Slots<K: Hash + Eq + Clone> {
    in_all: usize,
    held: Mutex<HashMap<K, usize>>,
}

/// One slot, counted until dropped.
pub struct Slot<K: Hash + Eq + Clone> {
    slots: Arc<Slots<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Slots<K> {
    /// Slots for at most `in_all` holders at once.
    pub fn new(in_all: usize) -> Arc<Self> {
        Arc::new(Self { in_all, held: Mutex::new(HashMap::new()) })
    }

    /// A slot for `key`, or None when `key` holds `cap` already or all are taken.
    pub fn take(self: &Arc<Self>, key: K, cap: usize) -> Option<Slot<K>> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let total: usize = held.values().sum();
        let mine = held.get(&key).copied().unwrap_or(0);
        if mine >= cap || total >= self.in_all {
            return None;
        }
        held.insert(key.clone(), mine + 1);
        Some(Slot { slots: self.clone(), key })
    }

    /// How many keys hold a slot.
    pub fn keys(&self) -> usize {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_and_all_are_capped_and_slots_come_back() {
        let slots = Slots::new(5);
        let a: Vec<_> = (0..3).map(|_| slots.take("a", 3).unwrap_or_else(|| panic!("taken"))).collect();
        assert!(slots.take("a", 3).is_none(), "a is at its cap");
        let b: Vec<_> = (0..2).map(|_| slots.take("b", 3).unwrap_or_else(|| panic!("taken"))).collect();
        assert!(slots.take("c", 3).is_none(), "all five are taken");
        assert_eq!(slots.keys(), 2, "a refused key leaves no entry");
        drop(a);
        assert_eq!(slots.keys(), 1);
        assert!(slots.take("a", 3).is_some(), "slots come back when dropped");
        drop(b);
    }
}
