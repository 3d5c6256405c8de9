//! Rows of the fleet's tables as the broker reads them.

use anyhow::{Context, Result};
use tokio_postgres::Row;

use super::super::store::{LeaseRecord, NodeRecord};

/// A broker as the fleet's table lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetBroker {
    pub id: String,
    pub node_ca: String,
    /// The fleet key's signature over the node CA, base64.
    pub node_ca_endorsement: String,
    pub audit_key: String,
    pub heartbeat_ms: i64,
}

/// The brokers of the fleet, alive or not.
pub(super) async fn brokers(client: &tokio_postgres::Client) -> Result<Vec<FleetBroker>> {
    let rows = client
        .query("SELECT id, node_ca, audit_key, heartbeat_ms, node_ca_endorsement FROM brokers ORDER BY id", &[])
        .await?;
    Ok(rows
        .iter()
        .map(|r| FleetBroker {
            id: r.get(0),
            node_ca: r.get(1),
            audit_key: r.get(2),
            heartbeat_ms: r.get(3),
            node_ca_endorsement: r.get(4),
        })
        .collect())
}

pub(super) const NODE_COLUMNS: &str =
    "name, labels, serial, previous_serial, not_after, revoked_at, last_seen, version, changed_ms, current_seen";

pub(super) fn node_from_row(r: &Row) -> Result<NodeRecord> {
    let labels: serde_json::Value = r.try_get(1)?;
    let revoked_at: Option<i64> = r.try_get(5)?;
    Ok(NodeRecord {
        name: r.try_get(0)?,
        labels: serde_json::from_value(labels).context("a node's labels in the database are not a string map")?,
        serial: r.try_get(2)?,
        previous_serial: r.try_get(3)?,
        current_seen: r.try_get(9)?,
        not_after: r.try_get(4)?,
        revoked: revoked_at.is_some(),
        revoked_at: revoked_at.unwrap_or(0),
        last_seen: r.try_get::<_, Option<i64>>(6)?.unwrap_or(0),
        version: r.try_get(7)?,
    })
}

pub(super) fn lease_from_row(r: &Row) -> Result<LeaseRecord> {
    Ok(LeaseRecord {
        lease_id: r.try_get(0)?,
        node: r.try_get(1)?,
        fingerprint: r.try_get(2)?,
        expires_at: r.try_get(3)?,
    })
}
