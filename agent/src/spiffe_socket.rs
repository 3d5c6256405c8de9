//! The agent's SPIFFE socket (`SPIFFE_ENDPOINT_SOCKET`, RFD 0011): gRPC
//! over a Unix socket serving the SPIFFE Workload API and Envoy SDS. Each
//! connection's caller is attested when it connects, and is checked again
//! to be the same process at every call.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Result;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use grantline_proto::slots::{Slot, Slots};
use grantline_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;

use crate::h2_authority::{AuthorityFix, MAX_HEADER_LIST};
use crate::sds::Sds;
use crate::spiffe_config::SdsNames;
use crate::svids::{Peer, Svids};
use crate::workload_api::WorkloadApi;

/// Connections one principal (`crate::principals`) may hold open at once,
/// and all callers together.
const PER_PRINCIPAL: usize = 64;
const IN_ALL: usize = 1024;
/// Streams one connection may hold open at once: each stream is a task
/// following the caller's SVID.
const STREAMS_PER_CONNECTION: u32 = 32;

/// An accepted connection and who made it. What the client sends passes
/// through [`AuthorityFix`] (grpc-core's socket-path `:authority`).
struct Attested {
    inner: UnixStream,
    peer: Peer,
    fix: AuthorityFix,
    /// Read from the client, not yet rewritten; rewritten, not yet read.
    input: Vec<u8>,
    output: Vec<u8>,
    _slot: Slot<crate::principals::Principal>,
}

impl Connected for Attested {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Attested {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.drain(..n);
                return Poll::Ready(Ok(()));
            }
            // What an earlier read left unprocessed (the rewriter's output
            // is bounded per call), before anything more is read.
            this.fix
                .feed(&mut this.input, &mut this.output)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            if !this.output.is_empty() {
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.input.extend_from_slice(read.filled());
            this.fix
                .feed(&mut this.input, &mut this.output)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
    }
}

impl AsyncWrite for Attested {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves the SPIFFE socket; returns only if the gRPC server fails.
pub(crate) async fn serve(svids: Arc<Svids>, listener: UnixListener, sds: SdsNames) -> Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Attested>>(16);
    let shares = svids.clone();
    tokio::spawn(async move {
        let open = Slots::new(IN_ALL);
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept on the SPIFFE socket; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let cred = stream.peer_cred().ok();
            let uid = cred.map_or(u32::MAX, |c| c.uid());
            let namespace = cred.and_then(|c| c.pid()).and_then(crate::principals::user_namespace);
            let principal = shares.principal(uid, namespace);
            // Past its principal's share (crate::principals) a caller's
            // connection is closed at once.
            let Some(slot) = open.take(principal, PER_PRINCIPAL) else {
                tracing::warn!(uid, ?principal, "SPIFFE socket connection refused: too many open for its principal");
                continue;
            };
            // Attested on a task of its own: the accept loop never waits on
            // what a caller controls.
            let tx = tx.clone();
            tokio::spawn(async move {
                let (caller, mark) = crate::local::attest(&stream).await.unzip();
                let peer = Peer { caller, mark, principal };
                let fix = AuthorityFix::default();
                let conn = Attested { inner: stream, peer, fix, input: Vec::new(), output: Vec::new(), _slot: slot };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .max_concurrent_streams(STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(u32::try_from(MAX_HEADER_LIST).unwrap_or(u32::MAX))
        .add_service(SpiffeWorkloadApiServer::new(WorkloadApi { svids: svids.clone() }))
        .add_service(SecretDiscoveryServiceServer::new(Sds { svids, names: sds }))
        .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    Ok(())
}
