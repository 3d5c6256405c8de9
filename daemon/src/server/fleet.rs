//! A broker in a fleet (RFD 0010): it applies the change feed of the shared
//! store to its registry (closing the connections of a node revoked at
//! another broker), trusts the node CA of every broker of the fleet, and
//! reports which nodes it holds.

use std::sync::{Arc, Weak};

use grantline_proto::wire::{self, ErrorCode};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;

use super::shared::Shared;
use super::{quic, revoke, tickets};
use crate::pki::{first_cert_der, Pki};
use crate::registry::Synced;
use crate::state::{Change, FleetBroker, NodeRecord};

/// The node CAs a broker trusts: its own and every fleet broker's.
pub(super) fn node_cas(pki: &Pki, brokers: &[FleetBroker]) -> Vec<CertificateDer<'static>> {
    let mut cas = vec![pki.node_ca.cert_der.clone()];
    for b in brokers {
        match first_cert_der(&b.node_ca) {
            Some(der) if !cas.contains(&der) => cas.push(der),
            Some(_) => {}
            None => {
                tracing::error!(broker = %b.id, "the fleet's table holds no usable node CA for this broker; its nodes are refused here")
            }
        }
    }
    cas
}

/// Applies the feed until the broker stops.
pub(super) async fn follow(
    shared: Weak<Shared>,
    mut changes: mpsc::Receiver<Change>,
    endpoint: quinn::Endpoint,
    tickets: Arc<tickets::TicketKeys>,
) {
    while let Some(change) = changes.recv().await {
        let Some(shared) = shared.upgrade() else { return };
        match change {
            Change::Nodes(records) => {
                for (record, changed_ms) in records {
                    apply(&shared, record, Some(changed_ms));
                }
            }
            Change::Resync(records) => {
                tracing::info!(nodes = records.len(), "the fleet's node records reloaded");
                for record in records {
                    apply(&shared, record, None);
                }
            }
            Change::Brokers(brokers) => {
                let alive = brokers
                    .iter()
                    .filter(|b| b.heartbeat_ms > crate::state::now_ms() - crate::state::BROKER_ALIVE_MS)
                    .count();
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!("grantline_fleet_brokers").set(alive as f64);
                let cas = node_cas(&shared.pki, &brokers);
                match quic::server_config(&shared.pki, &cas, tickets.clone()) {
                    Ok(cfg) => {
                        endpoint.set_server_config(Some(cfg));
                        tracing::info!(brokers = brokers.len(), node_cas = cas.len(), "the fleet's brokers changed");
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "cannot trust the fleet's node CAs; keeping the old set")
                    }
                }
            }
        }
    }
}

fn apply(shared: &Shared, record: NodeRecord, changed_ms: Option<i64>) {
    let name = record.name.clone();
    match shared.registry.sync(record) {
        Synced::Unchanged | Synced::Updated => {}
        Synced::Revoked(conns) => {
            let error =
                wire::Error::new(ErrorCode::Revoked, format!("node {name} was revoked at another broker of the fleet"));
            for conn in &conns {
                revoke::close_with(conn, &error);
            }
            if let Some(at) = changed_ms {
                #[allow(clippy::cast_precision_loss)]
                let delay = (crate::state::now_ms() - at).max(0) as f64 / 1000.0;
                metrics::histogram!("grantline_fleet_revocation_delay_seconds").record(delay);
            }
            tracing::warn!(node = %name, closed = conns.len(), "node revoked at another broker; its connections here closed");
        }
    }
}
