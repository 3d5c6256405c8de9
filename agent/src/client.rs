//! The agent as a client of the broker, for `get` callers and sinks: a
//! grant (its receipt checked before anything is used) and a release.

use std::time::Duration;

use anyhow::Result;
use grantline_proto::kind::Kind;
use grantline_proto::wire;
use grantline_proto::wire::ErrorCode;
use grantline_proto::wire::{request::Body as Req, response::Body as Resp};

use crate::broker::{call, CallError};
use crate::connection::connection;
use crate::inclusion::check_grant_receipt;
use crate::session::Agent;

impl Agent {
    /// Asks the broker for a credential and checks its receipt; an X.509
    /// request without SANs gets the node name.
    pub(crate) async fn grant(&self, mut g: wire::GrantRequest) -> Result<wire::GrantResponse, wire::Error> {
        let is_x509 = Kind::from_wire(g.kind) == Some(Kind::X509);
        if is_x509 && g.sans.is_empty() {
            g.sans = vec![self.config.node_name.clone()];
        }
        if self.revoked.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(wire::Error::new(ErrorCode::Revoked, "this node was revoked by the broker"));
        }
        let Some(conn) = connection(self, Duration::from_secs(5)).await else {
            return Err(CallError::NotConnected.to_wire());
        };
        match call(&conn, &wire::Request { body: Some(Req::Grant(g)) }).await {
            Err(e) => Err(e.to_wire()),
            Ok(wire::Response { body: Some(Resp::Grant(gr)) }) => match check_grant_receipt(self, &gr) {
                Ok(seq) => {
                    tracing::info!(seq, kind = gr.kind, "credential granted");
                    Ok(gr)
                }
                Err(e) => {
                    tracing::error!(error = %e, "the broker's receipt does not check out; credential discarded");
                    Err(wire::Error::new(ErrorCode::Internal, format!("credential discarded: {e}")))
                }
            },
            Ok(wire::Response { body: Some(Resp::Error(e)) }) => Err(e),
            Ok(_) => Err(wire::Error::new(ErrorCode::Internal, "unexpected reply from the broker")),
        }
    }

    /// Gives a lease back (a sink replacing its secret).
    pub(crate) async fn release(&self, lease_id: &str) -> Result<(), wire::Error> {
        let conn = connection(self, Duration::from_secs(5)).await.ok_or_else(|| CallError::NotConnected.to_wire())?;
        let req = wire::Request { body: Some(Req::Release(wire::ReleaseRequest { lease_id: lease_id.into() })) };
        match call(&conn, &req).await {
            Ok(wire::Response { body: Some(Resp::Release(_)) }) => Ok(()),
            Ok(wire::Response { body: Some(Resp::Error(e)) }) => Err(e),
            Ok(_) => Err(wire::Error::new(ErrorCode::Internal, "unexpected reply from the broker")),
            Err(e) => Err(e.to_wire()),
        }
    }
}
