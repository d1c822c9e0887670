//! Serving the process's metrics (`dig_common::metrics`) to Prometheus:
//! `GET /metrics` in the text format. The API (and `standalone`) adds the
//! route to its own listener ([`routes`]); `digctl coordinator` and `digctl
//! worker` have no HTTP server of their own and serve `/metrics` and
//! `/healthz` on `metrics.listen` ([`bind`], [`serve`]).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

/// `GET /metrics`, without authentication (bind the listener to a network
/// only Prometheus reaches, or filter it, as for any exporter).
pub fn routes() -> Router {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, dig_common::metrics::TEXT_CONTENT_TYPE)],
        dig_common::metrics::encode_text(),
    )
}

/// Binds `metrics.listen`, logging `metrics listening on http://ADDR` (the
/// port a `:0` address got); `None` when the setting is empty.
pub async fn bind(listen: &str) -> Result<Option<TcpListener>> {
    let listen = listen.trim();
    if listen.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = listen.parse().with_context(|| {
        format!("metrics.listen: {listen:?} is not an address like 127.0.0.1:9100")
    })?;
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} for metrics (metrics.listen, DIG_METRICS_LISTEN; \
             services on one host need a port each, or port 0 for any free one)"
        )
    })?;
    info!("metrics listening on http://{}", listener.local_addr()?);
    Ok(Some(listener))
}

/// Serves `/metrics` and `/healthz` on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, mut stop: watch::Receiver<bool>) -> Result<()> {
    let app = routes().route("/healthz", get(|| async { "ok" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}
