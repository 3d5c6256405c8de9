//! What a fleet broker tells the others about its connections: which
//! nodes it holds, for `grantline nodes list` on any broker (RFD 0010).

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use crate::state::{PgStore, StateStore};

/// This broker's part in the fleet.
pub(crate) struct Fleet {
    pub(crate) store: PgStore,
    /// The nodes last reported as connected here.
    reported: Mutex<HashSet<String>>,
}

impl Fleet {
    pub(crate) fn new(store: PgStore) -> Self {
        Self { store, reported: Mutex::new(HashSet::new()) }
    }

    /// Reports the nodes that connected or left since the last report.
    pub(super) async fn report_presence(&self, connected: HashSet<String>) {
        let (here, gone) = {
            let reported = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
            let here: Vec<String> = connected.difference(&reported).cloned().collect();
            let gone: Vec<String> = reported.difference(&connected).cloned().collect();
            (here, gone)
        };
        if here.is_empty() && gone.is_empty() {
            return;
        }
        match self.store.save_presence(here, gone).await {
            Ok(()) => *self.reported.lock().unwrap_or_else(PoisonError::into_inner) = connected,
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot report this broker's connections to the fleet"),
        }
    }
}
