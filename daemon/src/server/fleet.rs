//! A broker in a fleet (RFD 0010): it applies the change feed of the shared
//! store to its registry (closing the connections of a node revoked at
//! another broker), trusts the node CA of every broker of the fleet, and
//! reports which nodes it holds.

use std::sync::{Arc, Weak};

use grantline_proto::wire::{self, ErrorCode};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;

use super::shared::Shared;
use super::state_dir::node_ca_endorsed;
use super::{quic, revoke, tickets};
use crate::pki::{first_cert_der, Pki};
use crate::registry::Synced;
use crate::state::{Change, FleetBroker, NodeRecord};
use grantline_proto::audit::VerifierKey;

/// The node CAs a broker trusts: its own, and each other fleet broker's
/// that the fleet key endorsed (a row a database writer added is not).
pub(super) fn node_cas(
    pki: &Pki,
    brokers: &[FleetBroker],
    fleet_key: Option<&VerifierKey>,
) -> Vec<CertificateDer<'static>> {
    let mut cas = vec![pki.node_ca.cert_der.clone()];
    for b in brokers {
        let Some(der) = first_cert_der(&b.node_ca) else {
            tracing::error!(broker = %b.id, "the fleet's table holds no usable node CA for this broker; its nodes are refused here");
            continue;
        };
        if cas.contains(&der) {
            continue;
        }
        if !fleet_key.is_some_and(|k| node_ca_endorsed(k, &der, &b.node_ca_endorsement)) {
            tracing::error!(broker = %b.id, "a node CA in the fleet's table is not endorsed by this broker's fleet key; its nodes are refused here");
            continue;
        }
        cas.push(der);
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
                    .filter(|b| b.heartbeat_ms > grantline_proto::clock::now_unix_ms() - crate::state::BROKER_ALIVE_MS)
                    .count();
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!("grantline_fleet_brokers").set(alive as f64);
                let cas = node_cas(&shared.pki, &brokers, shared.fleet_vkey.as_ref());
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
                let delay = (grantline_proto::clock::now_unix_ms() - at).max(0) as f64 / 1000.0;
                metrics::histogram!("grantline_fleet_revocation_delay_seconds").record(delay);
            }
            tracing::warn!(node = %name, closed = conns.len(), "node revoked at another broker; its connections here closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use grantline_proto::audit::SignerKey;

    /// Review finding: node CAs were taken from the fleet's table as they
    /// were, so whoever could write the database could add a CA of their
    /// own, or another broker's workload X.509 CA.
    #[test]
    fn only_node_cas_the_fleet_key_endorsed_are_trusted() {
        let fleet = SignerKey::generate("fleet.test/key").unwrap();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let names = vec!["localhost".to_owned()];
        let (mine, other) =
            (Pki::load_or_create(a.path(), &names).unwrap(), Pki::load_or_create(b.path(), &names).unwrap());
        let endorse = |der: &[u8]| {
            base64::engine::general_purpose::STANDARD.encode(fleet.sign(&super::super::state_dir::node_ca_message(der)))
        };
        let row = |id: &str, node_ca: &str, node_ca_endorsement: String| FleetBroker {
            id: id.into(),
            node_ca: node_ca.into(),
            node_ca_endorsement,
            audit_key: String::new(),
            heartbeat_ms: 0,
        };
        let rows = [
            row("b", &other.node_ca.cert_pem, endorse(&other.node_ca.cert_der)),
            row("added", &other.x509_ca.cert_pem, String::new()),
            row("moved", &other.x509_ca.cert_pem, endorse(&other.node_ca.cert_der)),
            row("garbage", "not a certificate", "not base64".into()),
        ];
        let cas = node_cas(&mine, &rows, Some(fleet.verifier()));
        assert_eq!(cas, vec![mine.node_ca.cert_der.clone(), other.node_ca.cert_der.clone()]);
        assert_eq!(node_cas(&mine, &rows, None), vec![mine.node_ca.cert_der.clone()], "no fleet key: its own CA only");
    }
}
