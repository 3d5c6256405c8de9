//! Prometheus metrics: the `metrics` facade everywhere, rendered by
//! `metrics-exporter-prometheus` on `GET /metrics` of a loopback listener.
//!
//! | metric                                   | type      | labels          |
//! |------------------------------------------|-----------|-----------------|
//! | `grantline_connections`                  | gauge     |                 |
//! | `grantline_grants_total`                 | counter   | kind, outcome   |
//! | `grantline_audit_append_seconds`         | histogram |                 |
//! | `grantline_audit_append_failures_total`  | counter   |                 |
//! | `grantline_audit_entries`                | gauge     |                 |
//! | `grantline_checkpoint_age_seconds`       | gauge     |                 |
//! | `grantline_anchor_published_entries`     | gauge     |                 |
//! | `grantline_anchor_publish_failures_total`| counter   |                 |
//! | `grantline_vault_errors_total`           | counter   | op              |
//! | `grantline_nodes_revoked_total`          | counter   |                 |
//! | `grantline_policy_reloads_total`         | counter   | outcome         |
//! | `grantline_handshakes_total`             | counter   | outcome         |
//! | `grantline_handshakes_in_flight`         | gauge     |                 |
//! | `grantline_tls_resumptions_total`        | counter   |                 |

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Seconds; group commit keeps appends in the low milliseconds.
const APPEND_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// The process-wide Prometheus recorder, installed by the first call; later
/// calls (a second broker in one process, as tests run them) share it.
pub fn install() -> Result<PrometheusHandle> {
    static HANDLE: std::sync::Mutex<Option<PrometheusHandle>> = std::sync::Mutex::new(None);
    let mut installed = HANDLE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(h) = installed.as_ref() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("grantline_audit_append_seconds".into()), APPEND_BUCKETS)
        .context("histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Binds the metrics listener. Only loopback addresses are accepted: the
/// endpoint has no authentication.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    if !addr.ip().is_loopback() {
        anyhow::bail!("metrics address {addr} is not a loopback address; use e.g. 127.0.0.1:9464");
    }
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen for metrics on {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Sets gauges that are read at scrape time.
pub type Refresh = std::sync::Arc<dyn Fn() + Send + Sync>;

/// Serves `GET /metrics` until the task is dropped; `refresh` runs before
/// each rendering.
pub async fn serve(listener: std::net::TcpListener, handle: PrometheusHandle, refresh: Refresh) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "metrics listener failed");
            return;
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let handle = handle.clone();
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let handle = handle.clone();
                let refresh = refresh.clone();
                async move { Ok::<_, Infallible>(respond(&req, &handle, &refresh)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn respond(req: &Request<Incoming>, handle: &PrometheusHandle, refresh: &Refresh) -> Response<Full<Bytes>> {
    let (status, ctype, body) = if req.uri().path() == "/metrics" {
        refresh();
        handle.run_upkeep();
        (StatusCode::OK, "text/plain; version=0.0.4", handle.render())
    } else {
        (StatusCode::NOT_FOUND, "text/plain", "only /metrics is served here\n".to_owned())
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    /// A second broker in one process (tests start several) shares the
    /// recorder instead of failing to install its own.
    #[test]
    fn the_recorder_is_installed_once_and_shared() {
        let first = super::install().unwrap();
        let second = super::install().unwrap();
        metrics::counter!("grantline_test_shared_total").increment(1);
        assert!(first.render().contains("grantline_test_shared_total"));
        assert!(second.render().contains("grantline_test_shared_total"));
    }
}
