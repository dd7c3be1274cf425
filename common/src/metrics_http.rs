//! The Prometheus `/metrics` endpoint every process serves, in the OpenMetrics text format.

use std::sync::Arc;

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Serves `GET /metrics` from `registry`, and `GET /healthz` (200 while the process runs: the
/// probe a kubelet can use when gRPC runs over mutual TLS, which its gRPC probe cannot speak), on
/// `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app =
        Router::new().route("/metrics", get(render)).route("/healthz", get(|| async { "ok\n" })).with_state(registry);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn render(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut body = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut body, &registry) {
        tracing::error!(%error, "metrics encoding failed");
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
}
