//! The SPIFFE Workload API (the SPIFFE project's `workload.proto`) over the
//! agent's SPIFFE socket, as the SPIFFE Workload Endpoint and Workload API
//! standards ask: every call carries `workload.spiffe.io: true` (else
//! InvalidArgument), a caller the broker's policy maps to no SPIFFE ID gets
//! PermissionDenied, and the streams push a new SVID before the old one's
//! half-life and new bundles when they change (RFD 0011).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use base64::Engine as _;
use grantline_proto::wire::{self, ErrorCode};
use grantline_proto::workload as pb;
use grantline_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::svid::X509Svid;
use crate::svids::{Peer, State, Svids};

/// The longest JWT-SVID `ValidateJWTSVID` reads.
const MAX_TOKEN: usize = 16 * 1024;

pub(crate) struct WorkloadApi {
    pub svids: Arc<Svids>,
}

type Pushed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The gRPC status for a refusal from the broker or the agent.
pub(crate) fn status(e: &wire::Error) -> Status {
    let message = e.message.clone();
    match ErrorCode::try_from(e.code) {
        Ok(ErrorCode::PermissionDenied | ErrorCode::Revoked) => Status::permission_denied(message),
        Ok(ErrorCode::BadRequest) => Status::invalid_argument(message),
        Ok(ErrorCode::Unauthenticated) => Status::unauthenticated(message),
        Ok(ErrorCode::Unavailable) => Status::unavailable(message),
        _ => Status::internal(message),
    }
}

/// The attested caller of a request that carries the security header, and
/// the connection's peer, to check again before anything more is pushed.
pub(crate) fn caller_of<T>(req: &Request<T>, header: bool) -> Result<(wire::Caller, Peer), Status> {
    if header && req.metadata().get("workload.spiffe.io").and_then(|v| v.to_str().ok()) != Some("true") {
        return Err(Status::invalid_argument("security header missing from request: send workload.spiffe.io: true"));
    }
    let peer = req.extensions().get::<Peer>().cloned().ok_or_else(unattested)?;
    let caller = peer.current().cloned().ok_or_else(unattested)?;
    Ok((caller, peer))
}

pub(crate) fn unattested() -> Status {
    Status::permission_denied(
        "the calling process could not be attested (it exited, passed its socket on or ran another \
         program since it connected); connect again from the process that asks",
    )
}

/// Follows a caller's SVID state: `f` turns each SVID into the next message
/// (None: nothing new to say); a refusal ends the stream with its status,
/// and so does a connection whose process is no longer the caller it was
/// (it exec'd another program, or exited and left the socket to another):
/// no new key reaches it. The follower ends when the client goes, which
/// lets go of the SVID.
pub(crate) fn follow<T: Send + 'static>(
    peer: Peer,
    mut rx: tokio::sync::watch::Receiver<State>,
    mut f: impl FnMut(&X509Svid) -> Option<T> + Send + 'static,
) -> Pushed<T> {
    let (tx, out) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        loop {
            let state = rx.borrow_and_update().clone();
            let message = match state {
                State::Pending => None,
                State::Ready(_) if peer.current().is_none() => {
                    let _ = tx.send(Err(unattested())).await;
                    return;
                }
                State::Ready(svid) => f(&svid).map(Ok),
                State::Refused(e) => {
                    let _ = tx.send(Err(status(&e))).await;
                    return;
                }
            };
            if let Some(m) = message {
                if tx.send(m).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))
}

fn x509_response(svid: &X509Svid) -> pb::X509svidResponse {
    pb::X509svidResponse {
        svids: vec![pb::X509svid {
            spiffe_id: svid.spiffe_id.clone(),
            x509_svid: svid.chain_der.concat(),
            x509_svid_key: svid.key_der.clone(),
            bundle: svid.bundle_der.concat(),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    }
}

/// Emits `value(svid)` only when it differs from what was last emitted.
fn on_change<T: Send + 'static>(
    value: impl Fn(&X509Svid) -> Vec<u8> + Send + 'static,
    message: impl Fn(&X509Svid, Vec<u8>) -> T + Send + 'static,
) -> impl FnMut(&X509Svid) -> Option<T> + Send + 'static {
    let mut last: Option<Vec<u8>> = None;
    move |svid| {
        let now = value(svid);
        if last.as_ref() == Some(&now) {
            return None;
        }
        last = Some(now.clone());
        Some(message(svid, now))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Pushed<pb::X509svidResponse>;
    type FetchX509BundlesStream = Pushed<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = Pushed<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let (caller, peer) = caller_of(&req, true)?;
        let rx = self.svids.watch(&caller, peer.principal).map_err(|e| status(&e))?;
        Ok(Response::new(follow(peer, rx, |svid| Some(x509_response(svid)))))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let (caller, peer) = caller_of(&req, true)?;
        let rx = self.svids.watch(&caller, peer.principal).map_err(|e| status(&e))?;
        let f = on_change(
            |s| s.bundle_der.concat(),
            |s, bundle| pb::X509BundlesResponse {
                crl: Vec::new(),
                bundles: HashMap::from([(s.trust_domain_id(), bundle)]),
            },
        );
        Ok(Response::new(follow(peer, rx, f)))
    }

    async fn fetch_jwtsvid(&self, req: Request<pb::JwtsvidRequest>) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let (caller, peer) = caller_of(&req, true)?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let (spiffe_id, svid) =
            self.svids.jwt(&caller, peer.principal, r.audience, r.spiffe_id).await.map_err(|e| status(&e))?;
        // The broker may take a while: the caller must still be the caller.
        peer.current().ok_or_else(unattested)?;
        Ok(Response::new(pb::JwtsvidResponse { svids: vec![pb::Jwtsvid { spiffe_id, svid, hint: String::new() }] }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let (caller, peer) = caller_of(&req, true)?;
        let rx = self.svids.watch(&caller, peer.principal).map_err(|e| status(&e))?;
        let f = on_change(
            |s| s.jwt_bundle.as_bytes().to_vec(),
            |s, jwks| pb::JwtBundlesResponse { bundles: HashMap::from([(s.trust_domain_id(), jwks)]) },
        );
        Ok(Response::new(follow(peer, rx, f)))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let (caller, peer) = caller_of(&req, true)?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() || r.svid.len() > MAX_TOKEN {
            return Err(Status::invalid_argument(format!("svid must be a JWT of 1 to {MAX_TOKEN} bytes")));
        }
        let own = self.svids.current(&caller, peer.principal).await.map_err(|e| status(&e))?;
        let (spiffe_id, claims) = validate(&own, &r.svid, &r.audience)
            .map_err(|e| Status::invalid_argument(format!("the JWT-SVID is not valid: {e}")))?;
        Ok(Response::new(pb::ValidateJwtsvidResponse { spiffe_id, claims: Some(claims) }))
    }
}

/// Validates `token` for `audience` against the trust domain's JWT bundle
/// (the spiffe crate's JWT-SVID validation: signature, `exp`, `aud`, `sub`).
fn validate(own: &X509Svid, token: &str, audience: &str) -> Result<(String, prost_types::Struct), String> {
    let td = spiffe::TrustDomain::new(&own.trust_domain).map_err(|e| e.to_string())?;
    let bundle = spiffe::JwtBundle::from_jwt_authorities(td, own.jwt_bundle.as_bytes()).map_err(|e| e.to_string())?;
    let set: spiffe::JwtBundleSet = std::iter::once(bundle).collect();
    let svid = spiffe::JwtSvid::parse_and_validate(token, &set, &[audience]).map_err(|e| e.to_string())?;
    let payload = token.split('.').nth(1).ok_or("no payload")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).map_err(|e| e.to_string())?;
    let claims: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    Ok((svid.spiffe_id().to_string(), to_struct(claims)))
}

fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct { fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect() }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => {
            Kind::ListValue(prost_types::ListValue { values: a.into_iter().map(to_value).collect() })
        }
        serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn svid() -> Arc<X509Svid> {
        Arc::new(X509Svid {
            spiffe_id: "spiffe://example.org/w".into(),
            trust_domain: "example.org".into(),
            chain_der: vec![vec![1]],
            chain_pem: String::new(),
            key_der: vec![2],
            key_pem: String::new(),
            bundle_der: vec![vec![3]],
            bundle_pem: String::new(),
            jwt_bundle: String::new(),
            serial: "01".into(),
            not_after: 0,
        })
    }

    /// The peer of a process of ours, attested as the socket does it.
    fn peer_of(child: &std::process::Child) -> Peer {
        let pid = child.id();
        let caller = wire::Caller { pid, pidfd: true, ..Default::default() };
        let principal = crate::principals::Principal::Uid(0);
        Peer { caller: Some(caller), mark: crate::local::process_mark(pid), principal }
    }

    /// Review finding: a stream checked its caller only when it opened, so
    /// a process that exec'd another program (or died, leaving its socket
    /// to a child) kept receiving every renewed SVID and its private key.
    #[tokio::test]
    async fn a_stream_ends_before_a_new_key_reaches_a_process_that_is_no_longer_the_caller() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let peer = peer_of(&child);
        assert!(peer.mark.is_some() && peer.current().is_some());
        let (tx, rx) = tokio::sync::watch::channel(State::Ready(svid()));
        let mut stream = follow(peer, rx, |s| Some(s.serial.clone()));
        assert_eq!(stream.next().await.unwrap().unwrap(), "01", "the caller gets its SVID");
        child.kill().unwrap();
        child.wait().unwrap();
        tx.send_replace(State::Ready(svid()));
        let end = stream.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::PermissionDenied, "{end:?}");
        assert!(stream.next().await.is_none(), "the stream ends");
    }

    /// A caller read without a pidfd, or without a mark, is not attested.
    #[test]
    fn an_unpinned_caller_is_not_attested() {
        let child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let mut peer = peer_of(&child);
        assert!(peer.current().is_some());
        peer.caller.as_mut().unwrap().pidfd = false;
        assert!(peer.current().is_none(), "no pidfd");
        let mut peer = peer_of(&child);
        peer.mark = None;
        assert!(peer.current().is_none(), "no mark");
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
