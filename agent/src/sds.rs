//! Envoy's Secret Discovery Service (`envoy.service.secret.v3`, compiled for
//! tonic by the `envoy-types` crate) on the SPIFFE socket: the caller's
//! X509-SVID as a `tls_certificate` and the trust bundle as a
//! `validation_context`, by configurable resource names (`default` and
//! `ROOTCA` like Istio's agent; the SPIFFE ID and the trust domain's ID
//! like SPIRE's). `StreamSecrets` pushes both again at every rotation.

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, TlsCertificate,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::spiffe_config::SdsNames;
use crate::svid::X509Svid;
use crate::svids::{State, Svids};
use crate::workload_api::{caller_of, status, unattested};

/// The type of every resource SDS serves.
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The most resource names one request may ask for.
const MAX_NAMES: usize = 64;

pub(crate) struct Sds {
    pub svids: Arc<Svids>,
    pub names: SdsNames,
}

fn inline(bytes: &str) -> Option<DataSource> {
    Some(DataSource { specifier: Some(Specifier::InlineBytes(bytes.as_bytes().to_vec())), ..Default::default() })
}

/// The secret called `name` for this SVID, if it is one SDS serves.
fn secret(names: &SdsNames, svid: &X509Svid, name: &str) -> Option<Secret> {
    let kind = if name == names.certificate || name == svid.spiffe_id {
        secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&svid.chain_pem),
            private_key: inline(&svid.key_pem),
            ..Default::default()
        })
    } else if name == names.bundle || name == svid.trust_domain_id() {
        secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: inline(&svid.bundle_pem),
            ..Default::default()
        })
    } else {
        return None;
    };
    Some(Secret { name: name.to_owned(), r#type: Some(kind) })
}

fn response(names: &SdsNames, svid: &X509Svid, wanted: &[String], nonce: u64) -> DiscoveryResponse {
    let resources = wanted
        .iter()
        .filter_map(|n| secret(names, svid, n))
        .map(|s| Any { type_url: SECRET_TYPE.into(), value: s.encode_to_vec() })
        .collect();
    DiscoveryResponse {
        version_info: svid.serial.clone(),
        resources,
        type_url: SECRET_TYPE.into(),
        nonce: nonce.to_string(),
        ..Default::default()
    }
}

fn check(req: &DiscoveryRequest) -> Result<(), Status> {
    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE {
        return Err(Status::invalid_argument(format!("type_url must be {SECRET_TYPE}")));
    }
    if req.resource_names.len() > MAX_NAMES || req.resource_names.iter().any(|n| n.len() > 2048) {
        return Err(Status::invalid_argument(format!("at most {MAX_NAMES} resource names of up to 2048 bytes")));
    }
    Ok(())
}

type Pushed = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
    type StreamSecretsStream = Pushed;

    async fn delta_secrets(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("use StreamSecrets or FetchSecrets (state of the world)"))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (caller, peer) = caller_of(&req, false)?;
        let mut rx = self.svids.watch(&caller, peer.principal).map_err(|e| status(&e))?;
        let mut requests = req.into_inner();
        let names = self.names.clone();
        let (tx, out) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            // The names Envoy asked for last, and the SVID last sent for them.
            let mut wanted: Option<Vec<String>> = None;
            let mut sent: Option<(Vec<String>, String)> = None;
            let mut nonce = 0u64;
            loop {
                let state = rx.borrow_and_update().clone();
                match (&state, &wanted) {
                    (State::Refused(e), _) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                    (State::Ready(svid), Some(w)) if sent.as_ref() != Some(&(w.clone(), svid.serial.clone())) => {
                        // No new key for a connection whose process is no longer the caller.
                        if peer.current().is_none() {
                            let _ = tx.send(Err(unattested())).await;
                            return;
                        }
                        nonce += 1;
                        if tx.send(Ok(response(&names, svid, w, nonce))).await.is_err() {
                            return;
                        }
                        sent = Some((w.clone(), svid.serial.clone()));
                    }
                    _ => {}
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    next = requests.next() => match next {
                        Some(Ok(r)) => {
                            if let Err(e) = check(&r) {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                            // An ACK or NACK repeats the names: only new names are answered.
                            wanted = Some(r.resource_names);
                        }
                        _ => return,
                    },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }

    async fn fetch_secrets(&self, req: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        let (caller, peer) = caller_of(&req, false)?;
        let r = req.into_inner();
        check(&r)?;
        let svid = self.svids.current(&caller, peer.principal).await.map_err(|e| status(&e))?;
        // The SVID may have taken a while: the caller must still be the caller.
        peer.current().ok_or_else(unattested)?;
        Ok(Response::new(response(&self.names, &svid, &r.resource_names, 1)))
    }
}
