//! Every process's `/metrics`: Prometheus' classic text format unless the scraper asks for
//! OpenMetrics, clean under `promtool check metrics`, with process, build and per-RPC series.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use switchyard_integration_tests::{
    TestCluster, hidden_states, http_get_any, http_response_with, metric_value, small_model,
};

/// `GET /metrics` with `accept`; the content type and the body.
async fn scrape(address: SocketAddr, accept: Option<&str>) -> (String, String) {
    let accept = accept.map(|accept| format!("Accept: {accept}\r\n")).unwrap_or_default();
    let response = http_response_with(address, "/metrics", &accept).await;
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
    tokio::spawn(switchyard_common::metrics_http::serve(
        listener,
        Arc::new(registry),
        switchyard_common::readiness::Readiness::ready(),
        std::future::pending(),
    ));

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

/// The metric names an expression of the chart's alerts or dashboard queries (`switchyard_*`,
/// `grpc_server_*`, `process_*`).
fn queried_series(expressions: &str) -> std::collections::BTreeSet<String> {
    expressions
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| ["switchyard_", "grpc_server_", "process_"].iter().any(|prefix| word.starts_with(prefix)))
        .map(str::to_owned)
        .collect()
}

/// Every series the chart's alerts and Grafana dashboard query is one the coordinator or a worker
/// serves: a renamed metric would otherwise leave an alert that never fires and a panel without
/// data, and nothing else would say so.
#[tokio::test]
async fn the_chart_s_alerts_and_dashboard_query_only_series_the_processes_serve() {
    let cluster = TestCluster::start(small_model(2.0), 1, |_| {}).await;
    cluster.client.forward(0, &hidden_states(16, 256, 1)).await.expect("forward");
    let mut served = String::new();
    for address in [cluster.processes.coordinator.metrics, cluster.processes.workers[0].metrics] {
        served += &scrape(address, None).await.1;
    }
    let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/switchyard");
    for file in ["templates/prometheusrule.yaml", "dashboards/switchyard.json"] {
        let text = std::fs::read_to_string(chart.join(file)).expect("the chart's file");
        let queried = queried_series(&text);
        assert!(queried.len() >= 5, "{file}: {queried:?}");
        let missing: Vec<_> = queried
            .iter()
            .filter(|name| {
                !served
                    .lines()
                    .any(|line| line.strip_prefix(name.as_str()).is_some_and(|rest| rest.starts_with(['{', ' '])))
            })
            .collect();
        assert!(missing.is_empty(), "{file} queries series no process serves: {missing:?}");
    }
}

/// The worker's readiness as its probes see it: the named health service, `/readyz`, and the
/// unnamed service (liveness), which must say SERVING throughout.
async fn worker_probes(worker: &switchyard_common::children::ChildProcess) -> (i32, (u16, String), i32) {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = switchyard_common::transport::channel(&worker.grpc_uri()).expect("channel");
    let mut health = HealthClient::new(channel);
    let mut status = async |service: &str| {
        let request = HealthCheckRequest { service: service.into() };
        health.check(request).await.expect("health check").into_inner().status
    };
    let named = status("switchyard.v1.ExpertWorker").await;
    let unnamed = status("").await;
    (named, http_get_any(worker.metrics, "/readyz").await, unnamed)
}

#[tokio::test]
async fn a_worker_is_ready_once_its_placed_experts_are_loaded_and_live_throughout() {
    use switchyard_loadtest::local_cluster::{LocalCluster, LocalClusterConfig};
    use tonic_health::pb::health_check_response::ServingStatus;
    let (serving, not_serving) = (ServingStatus::Serving as i32, ServingStatus::NotServing as i32);

    let binaries = switchyard_integration_tests::binaries_dir();
    let mut config = LocalClusterConfig::next_to(&binaries.join("switchyard"), small_model(2.0), 1);
    config.heartbeat_interval = std::time::Duration::from_millis(100);
    config.min_workers = 2;
    let mut cluster = LocalCluster::start(config).await.expect("a coordinator and one worker");

    // One of the two workers the coordinator waits for: nothing placed, so not ready, yet alive.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (named, (code, reason), unnamed) = worker_probes(&cluster.workers[0]).await;
    assert_eq!((named, code, unnamed), (not_serving, 503, serving), "{reason}");
    assert!(reason.contains("first placement"), "{reason}");

    cluster.add_worker().await.expect("the second worker");
    for worker in &cluster.workers {
        let mut probes = worker_probes(worker).await;
        for _ in 0..100 {
            if probes.0 == serving {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            probes = worker_probes(worker).await;
        }
        let (named, (code, body), unnamed) = probes;
        assert_eq!((named, code, unnamed), (serving, 200, serving), "placed and loaded: {body}");
    }
    let status = switchyard_integration_tests::http_get(cluster.coordinator.metrics, "/readyz").await;
    assert!(status.ends_with("ready\n"), "the coordinator is ready once it serves: {status}");
}

/// A `Forward` of `tokens` f32 rows of the small model's width for expert 0 of layer 0.
fn expert_zero_forward(request_id: u64, tokens: usize) -> switchyard_proto::v1::ForwardRequest {
    use switchyard_proto::v1::{self, Dtype};
    use switchyard_proto::wire::{self, WireDtype};
    let width = small_model(2.0).d_model as usize;
    v1::ForwardRequest {
        request_id,
        batches: vec![v1::ExpertRows {
            expert: Some(v1::ExpertKey::new(0, 0)),
            rows: Some(v1::WireTensor {
                dtype: Dtype::F32 as i32,
                shape: vec![tokens as u64, width as u64],
                data: wire::encode_f32(&hidden_states(tokens, width, 4), WireDtype::F32),
            }),
        }],
        ..Default::default()
    }
}

/// A call whose `grpc-timeout` passes on the client's own timer: tonic's timeout layer there
/// answers CANCELLED "Timeout expired", which the client reads as DEADLINE_EXCEEDED. The worker
/// counts a call it saw as past its deadline, or cancelled when the client's reset came first
/// (which of the two, and whether the request got there at all, is a race; the labelling itself is
/// tested in `common::grpc_metrics`, the worker's own answer below).
#[tokio::test]
async fn a_call_past_its_deadline_is_deadline_exceeded_to_the_client() {
    use switchyard_proto::v1::expert_worker_client::ExpertWorkerClient;
    let cluster = TestCluster::start(small_model(2.0), 1, |_| {}).await;
    let worker = &cluster.processes.workers[0];
    let mut request = tonic::Request::new(expert_zero_forward(9, 2048));
    request.set_timeout(std::time::Duration::from_millis(1));
    let channel = switchyard_common::transport::channel(&worker.grpc_uri()).expect("channel");
    let status = ExpertWorkerClient::new(channel)
        .max_encoding_message_size(64 << 20)
        .forward(request)
        .await
        .expect_err("the deadline passes while the worker computes");
    let error = switchyard_router_client::ClientError::from_status(&worker.grpc_uri(), &status);
    assert_eq!(error.code(), tonic::Code::DeadlineExceeded, "{status:?} read as {error}");

    // The call may end before its request reached the worker; if it did reach it, it is counted
    // as not answered once the reset or the worker's timer has ended it.
    let labels = "grpc_service=\"switchyard.v1.ExpertWorker\",grpc_method=\"Forward\"";
    let mut text = String::new();
    for _ in 0..50 {
        text = scrape(worker.metrics, None).await.1;
        let value = |name: String| metric_value(&text, &name).unwrap_or(0.0);
        let handled = |code: &str| value(format!("grpc_server_handled_total{{{labels},grpc_code=\"{code}\"}}"));
        let started = value(format!("grpc_server_started_total{{{labels}}}"));
        assert_eq!(handled("OK"), 0.0, "{text}");
        if started == handled("DeadlineExceeded") + handled("Canceled") {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("a Forward the worker saw was counted as neither past its deadline nor cancelled: {text}");
}

/// A deadline only the worker keeps (the `grpc-timeout` header sent over a plain HTTP/2 client:
/// tonic's channel would end the call on its own timer first): the worker answers
/// DEADLINE_EXCEEDED on the wire, naming the deadline, where tonic's own timeout layer would
/// answer CANCELLED, and counts it so.
#[tokio::test]
async fn the_worker_answers_a_passed_deadline_with_deadline_exceeded() {
    use switchyard_proto::v1::expert_worker_client::ExpertWorkerClient;
    let cluster = TestCluster::start(small_model(2.0), 1, |_| {}).await;
    let worker = &cluster.processes.workers[0];
    // 1 ms, less the layer's tick: the deadline has passed once the call waits on the compute.
    let mut request = tonic::Request::new(expert_zero_forward(10, 64));
    request.metadata_mut().insert("grpc-timeout", "1m".parse().expect("ascii"));
    let http2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<tonic::body::Body>();
    let origin = worker.grpc_uri().parse().expect("the worker's URI");
    let status =
        ExpertWorkerClient::with_origin(http2, origin).forward(request).await.expect_err("the deadline passes");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("grpc-timeout 1ms"), "{status:?}");

    let labels = "grpc_service=\"switchyard.v1.ExpertWorker\",grpc_method=\"Forward\"";
    let text = scrape(worker.metrics, None).await.1;
    let handled =
        |code: &str| metric_value(&text, &format!("grpc_server_handled_total{{{labels},grpc_code=\"{code}\"}}"));
    assert_eq!(handled("DeadlineExceeded"), Some(1.0), "{text}");
    assert_eq!(handled("Canceled"), None, "{text}");
}
