//! Every process's `/metrics`: Prometheus' classic text format unless the scraper asks for
//! OpenMetrics, clean under `promtool check metrics`, with process, build and per-RPC series.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use switchyard_integration_tests::{TestCluster, hidden_states, metric_value, small_model};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /metrics` with `accept`; the content type and the body.
async fn scrape(address: SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect to /metrics");
    let accept = accept.map(|accept| format!("Accept: {accept}\r\n")).unwrap_or_default();
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n{accept}\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers, then the body");
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_owned))
        .expect("a content type");
    (content_type, body.to_owned())
}

/// promtool: `SWITCHYARD_PROMTOOL`, else where `scripts/setup-chart-tools.sh` puts it, else `PATH`.
fn promtool() -> PathBuf {
    if let Some(path) = std::env::var_os("SWITCHYARD_PROMTOOL") {
        return path.into();
    }
    let installed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/prometheus/promtool");
    if installed.exists() {
        return installed;
    }
    PathBuf::from("promtool")
}

fn promtool_check(endpoint: &str, body: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/setup-chart-tools.sh installs it into .tools/prometheus)");
    child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("metrics to promtool");
    let output = child.wait_with_output().expect("promtool finishes");
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && said.trim().is_empty(), "promtool on the {endpoint}'s metrics:\n{said}");
}

#[tokio::test]
async fn every_endpoint_passes_promtool_with_process_build_and_per_rpc_series() {
    let cluster = TestCluster::start(small_model(2.0), 2, |_| {}).await;
    cluster.client.forward(0, &hidden_states(16, 256, 1)).await.expect("forward");

    // The client's endpoint, as `switchyard loadtest --metrics-listen` serves it.
    let mut registry = prometheus_client::registry::Registry::default();
    cluster.client.metrics().register(&mut registry);
    switchyard_common::process_metrics::register(&mut registry, "client");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client_metrics = listener.local_addr().expect("address");
    tokio::spawn(switchyard_common::metrics_http::serve(listener, Arc::new(registry), std::future::pending()));

    let endpoints = [
        ("coordinator", cluster.processes.coordinator.metrics),
        ("worker", cluster.processes.workers[0].metrics),
        ("client", client_metrics),
    ];
    let version = env!("CARGO_PKG_VERSION");
    for (component, address) in endpoints {
        let (content_type, body) = scrape(address, None).await;
        assert!(content_type.starts_with("text/plain; version=0.0.4"), "{component}: {content_type}");
        promtool_check(component, &body);
        let build = format!("switchyard_build_info{{component=\"{component}\",version=\"{version}\"}}");
        assert_eq!(metric_value(&body, &build), Some(1.0), "{component}:\n{body}");
        let resident = metric_value(&body, "process_resident_memory_bytes").expect("resident memory");
        assert!(resident > 1e6, "{component}: {resident} bytes resident");
        assert!(metric_value(&body, "process_open_fds").is_some_and(|fds| fds > 0.0), "{component}");

        // Prometheus asks for OpenMetrics and gets it.
        let (content_type, body) =
            scrape(address, Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")).await;
        assert!(content_type.starts_with("application/openmetrics-text"), "{component}: {content_type}");
        assert!(body.ends_with("# EOF\n"), "{component}");
    }

    // Per-RPC series on both servers.
    let (_, worker) = scrape(cluster.processes.workers[0].metrics, None).await;
    let (_, other_worker) = scrape(cluster.processes.workers[1].metrics, None).await;
    let forwards = |body: &str| {
        metric_value(
            body,
            "grpc_server_handled_total{grpc_service=\"switchyard.v1.ExpertWorker\",grpc_method=\"Forward\",grpc_code=\"OK\"}",
        )
        .unwrap_or(0.0)
    };
    assert!(forwards(&worker) + forwards(&other_worker) >= 1.0, "a forward was counted:\n{worker}");
    let (_, coordinator) = scrape(cluster.processes.coordinator.metrics, None).await;
    let registered = metric_value(
        &coordinator,
        "grpc_server_handled_total{grpc_service=\"switchyard.v1.Coordinator\",grpc_method=\"RegisterWorker\",grpc_code=\"OK\"}",
    );
    assert_eq!(registered, Some(2.0), "both workers registered:\n{coordinator}");
    let timed = metric_value(
        &coordinator,
        "grpc_server_handling_seconds_count{grpc_service=\"switchyard.v1.Coordinator\",grpc_method=\"RegisterWorker\"}",
    );
    assert_eq!(timed, Some(2.0), "both registrations timed:\n{coordinator}");
}
