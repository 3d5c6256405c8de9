//! The fleet's schema in PostgreSQL, created and migrated by the brokers at
//! start. Steps are numbered and applied in order under a transaction-level
//! advisory lock, so several brokers starting at once apply each step once.
//!
//! Every table is plain SQL a DBA can read; the two triggers are the change
//! feed (RFD 0010): a change to what decides a node's standing takes a new
//! `version` from a sequence and notifies `grantline_nodes`, and a change to
//! the set of brokers notifies `grantline_brokers`. Heartbeats and last-seen
//! times change neither, so idle agents cost the database nothing.

use anyhow::{Context, Result};

/// The advisory lock key that serializes migrations ("grntline" in ASCII).
const MIGRATION_LOCK: i64 = 0x6772_6e74_6c69_6e65;

/// Schema steps, each applied once, in order; never edit a released step.
const STEPS: &[&str] = &[
    // 1: the fleet's shared state.
    r#"
CREATE TABLE join_tokens (
    id          text PRIMARY KEY,
    secret_hash bytea NOT NULL,
    node        text,
    labels      jsonb NOT NULL,
    created_at  bigint NOT NULL,
    created_by  text NOT NULL,
    expires_at  bigint NOT NULL,
    used_at     bigint,
    used_by     text
);
CREATE SEQUENCE node_versions;
CREATE TABLE nodes (
    name            text PRIMARY KEY,
    labels          jsonb NOT NULL,
    serial          text NOT NULL,
    previous_serial text NOT NULL DEFAULT '',
    not_after       bigint NOT NULL,
    enrolled_at     bigint NOT NULL,
    revoked_at      bigint,
    last_seen       bigint,
    version         bigint NOT NULL DEFAULT 0,
    changed_ms      bigint NOT NULL DEFAULT 0
);
CREATE INDEX nodes_by_version ON nodes (version);
CREATE TABLE leases (
    lease_id    text PRIMARY KEY,
    node        text NOT NULL,
    fingerprint text NOT NULL,
    expires_at  bigint NOT NULL,
    granted_by  text NOT NULL,
    revoked_at  bigint
);
CREATE INDEX leases_by_node ON leases (node) WHERE revoked_at IS NULL;
CREATE TABLE brokers (
    id           text PRIMARY KEY,
    node_ca      text NOT NULL,
    audit_key    text NOT NULL,
    started_at   bigint NOT NULL,
    heartbeat_ms bigint NOT NULL
);
CREATE TABLE presence (
    node   text NOT NULL,
    broker text NOT NULL,
    since  bigint NOT NULL,
    PRIMARY KEY (node, broker)
);
CREATE FUNCTION grantline_node_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.revoked_at IS NOT NULL AND NEW.revoked_at IS DISTINCT FROM OLD.revoked_at THEN
        RAISE EXCEPTION 'node % was revoked; a revocation is never undone', OLD.name;
    END IF;
    IF TG_OP = 'INSERT' OR NEW.serial IS DISTINCT FROM OLD.serial
        OR NEW.previous_serial IS DISTINCT FROM OLD.previous_serial
        OR NEW.revoked_at IS DISTINCT FROM OLD.revoked_at OR NEW.labels IS DISTINCT FROM OLD.labels
        OR NEW.not_after IS DISTINCT FROM OLD.not_after THEN
        NEW.version := nextval('node_versions');
        NEW.changed_ms := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
        PERFORM pg_notify('grantline_nodes', NEW.name);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER nodes_changed BEFORE INSERT OR UPDATE ON nodes
    FOR EACH ROW EXECUTE FUNCTION grantline_node_changed();
CREATE FUNCTION grantline_brokers_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' OR NEW.node_ca IS DISTINCT FROM OLD.node_ca
        OR NEW.audit_key IS DISTINCT FROM OLD.audit_key THEN
        PERFORM pg_notify('grantline_brokers', '');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER brokers_changed AFTER INSERT OR UPDATE OR DELETE ON brokers
    FOR EACH ROW EXECUTE FUNCTION grantline_brokers_changed();
"#,
    // 2: whether a node's current identity was used (shared, so a leaked
    // previous identity cannot renew at another broker once the current
    // one was used anywhere), and each broker's node CA endorsed by the
    // fleet key (a database writer cannot add a CA of its own).
    r#"
ALTER TABLE nodes ADD COLUMN current_seen boolean NOT NULL DEFAULT true;
ALTER TABLE brokers ADD COLUMN node_ca_endorsement text NOT NULL DEFAULT '';
CREATE OR REPLACE FUNCTION grantline_node_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.revoked_at IS NOT NULL AND NEW.revoked_at IS DISTINCT FROM OLD.revoked_at THEN
        RAISE EXCEPTION 'node % was revoked; a revocation is never undone', OLD.name;
    END IF;
    IF TG_OP = 'INSERT' OR NEW.serial IS DISTINCT FROM OLD.serial
        OR NEW.previous_serial IS DISTINCT FROM OLD.previous_serial
        OR NEW.revoked_at IS DISTINCT FROM OLD.revoked_at OR NEW.labels IS DISTINCT FROM OLD.labels
        OR NEW.not_after IS DISTINCT FROM OLD.not_after OR NEW.current_seen IS DISTINCT FROM OLD.current_seen THEN
        NEW.version := nextval('node_versions');
        NEW.changed_ms := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
        PERFORM pg_notify('grantline_nodes', NEW.name);
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION grantline_brokers_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' OR NEW.node_ca IS DISTINCT FROM OLD.node_ca
        OR NEW.audit_key IS DISTINCT FROM OLD.audit_key
        OR NEW.node_ca_endorsement IS DISTINCT FROM OLD.node_ca_endorsement THEN
        PERFORM pg_notify('grantline_brokers', '');
    END IF;
    RETURN NULL;
END $$;
"#,
];

/// The schema version this broker was built for.
#[allow(clippy::cast_possible_truncation)] // a handful of steps
pub const VERSION: i32 = STEPS.len() as i32;

/// Brings the schema up to [`VERSION`]; refuses a database a newer broker
/// has migrated further (an older broker would misread it).
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS grantline_schema (one boolean PRIMARY KEY DEFAULT true CHECK (one), version integer NOT NULL)")
        .await?;
    let version: i32 = tx.query_opt("SELECT version FROM grantline_schema", &[]).await?.map_or(0, |r| r.get(0));
    anyhow::ensure!(
        version <= VERSION,
        "the database schema is at version {version}, newer than this broker's {VERSION}; upgrade this broker"
    );
    for (step, sql) in (1i32..).zip(STEPS).skip(usize::try_from(version).unwrap_or(0)) {
        tx.batch_execute(sql).await.with_context(|| format!("cannot apply schema step {step}"))?;
        tracing::info!(step, "database schema migrated");
    }
    tx.execute(
        "INSERT INTO grantline_schema (version) VALUES ($1) ON CONFLICT (one) DO UPDATE SET version = excluded.version",
        &[&VERSION],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}
