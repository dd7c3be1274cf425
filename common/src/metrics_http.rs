//! The Prometheus `/metrics` endpoint every process serves: Prometheus' classic text format, or
//! OpenMetrics for a scraper that asks for it (Prometheus does).

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode, header};
use axum::{Router, extract::State, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::metrics_text;
use crate::readiness::Readiness;

/// Serves `GET /metrics` from `registry`, `GET /healthz` (200 while the process runs) and `GET
/// /readyz` (200 when `readiness` says so, else 503 and why) on `listener` until `shutdown`
/// resolves: the probes a kubelet can use when gRPC runs over mutual TLS, which its gRPC probe
/// cannot speak.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render).with_state(registry))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready).with_state(readiness));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn ready(State(readiness): State<Readiness>) -> (StatusCode, String) {
    match readiness.not_ready_because() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

async fn render(State(registry): State<Arc<Registry>>, headers: HeaderMap) -> impl IntoResponse {
    let mut openmetrics = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut openmetrics, &registry) {
        tracing::error!(%error, "metrics encoding failed");
    }
    if asks_for_openmetrics(&headers) {
        ([(header::CONTENT_TYPE, metrics_text::OPENMETRICS_CONTENT_TYPE)], openmetrics)
    } else {
        ([(header::CONTENT_TYPE, metrics_text::CONTENT_TYPE)], metrics_text::from_openmetrics(&openmetrics))
    }
}

fn asks_for_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|accept| accept.to_str().ok())
        .any(|accept| accept.contains("application/openmetrics-text"))
}
