//! The broker's mutable state: join tokens (stored hashed), enrolled nodes
//! and the Vault leases handed out, behind the [`StateStore`] trait. Two
//! implementations: [`StateDb`] (SQLite, `state.db`, one broker's own) and
//! [`PgStore`] (PostgreSQL, shared by a fleet of brokers, with a change
//! feed that keeps every broker's registry current; RFD 0010). The audit log is
//! separate and append-only; this state is not.

mod postgres;
mod sqlite;
mod store;
mod token;

pub use postgres::{
    redacted, Change, FleetAdmin, FleetBroker, PgConfig, PgStore, StateFile, ThisBroker, BROKER_ALIVE_MS,
    DEFAULT_MAX_STALENESS, DEFAULT_POOL_SIZE, MAX_POOL_SIZE,
};
pub use sqlite::StateDb;
pub use store::{
    replaced_identity, Accept, LeaseRecord, NewToken, NodeRecord, Redeemed, Replace, StateStore, StoreFuture,
    TokenError, TokenFuture, Upsert,
};
