//! The broker's mutable state: join tokens (stored hashed), enrolled nodes
//! and the Vault leases handed out, behind the [`StateStore`] trait. One
//! implementation today, [`StateDb`] (SQLite, `state.db`); the trait is
//! asynchronous so that a networked store (PostgreSQL, for a fleet of
//! brokers) implements it without touching its callers. The audit log is
//! separate and append-only; this state is not.

mod sqlite;
mod store;

pub use sqlite::StateDb;
pub use store::{
    replaced_identity, Accept, LeaseRecord, NewToken, NodeRecord, Redeemed, StateStore, StoreFuture, TokenError,
    TokenFuture,
};
