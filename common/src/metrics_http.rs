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

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// `GET path` over HTTP/1.1 with `accept`, as a scraper or a kubelet's probe asks: the status
    /// line and headers, then the body.
    async fn get(address: std::net::SocketAddr, path: &str, accept: &str) -> String {
        let mut socket = tokio::net::TcpStream::connect(address).await.expect("connect");
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: switchyard\r\nAccept: {accept}\r\nConnection: close\r\n\r\n");
        socket.write_all(request.as_bytes()).await.expect("request");
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await.expect("answer");
        answer
    }

    #[tokio::test]
    async fn metrics_come_in_the_format_asked_for_and_the_probes_say_how_the_process_is() {
        let mut registry = Registry::default();
        let calls = Counter::<u64>::default();
        registry.register("calls", "Calls served", calls.clone());
        calls.inc_by(3);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let readiness = Readiness::not_ready("loading experts");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve(listener, Arc::new(registry), readiness.clone(), async {
            let _ = stopped.await;
        }));

        let classic = get(address, "/metrics", "text/plain").await;
        assert!(classic.starts_with("HTTP/1.1 200"), "{classic}");
        assert!(classic.contains(metrics_text::CONTENT_TYPE) && classic.contains("\ncalls_total 3\n"), "{classic}");
        assert!(!classic.contains("# EOF"), "the classic format has no OpenMetrics trailer: {classic}");
        let openmetrics = get(address, "/metrics", "application/openmetrics-text;version=1.0.0,text/plain;q=0.5").await;
        assert!(openmetrics.contains(metrics_text::OPENMETRICS_CONTENT_TYPE), "{openmetrics}");
        assert!(openmetrics.contains("\ncalls_total 3\n") && openmetrics.contains("# EOF"), "{openmetrics}");

        assert!(get(address, "/healthz", "*/*").await.starts_with("HTTP/1.1 200"));
        let waiting = get(address, "/readyz", "*/*").await;
        assert!(waiting.starts_with("HTTP/1.1 503") && waiting.ends_with("not ready: loading experts\n"), "{waiting}");
        readiness.set_ready();
        let ready = get(address, "/readyz", "*/*").await;
        assert!(ready.starts_with("HTTP/1.1 200") && ready.ends_with("\r\n\r\nready\n"), "{ready}");

        stop.send(()).expect("the server runs");
        served.await.expect("the server's task").expect("served until shut down");
    }

    #[test]
    fn only_an_accept_naming_openmetrics_gets_it() {
        let headers = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::ACCEPT, value.parse().expect("a header value"));
            }
            headers
        };
        assert!(!asks_for_openmetrics(&headers(&[])));
        assert!(!asks_for_openmetrics(&headers(&["text/plain;version=0.0.4", "*/*"])));
        assert!(asks_for_openmetrics(&headers(&["text/plain", "application/openmetrics-text; version=1.0.0"])));
    }
}
