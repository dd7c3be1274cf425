//! One forward's trace, exported over OTLP by the client (this process) and a worker process to a
//! collector stand-in: the client's call, the worker's request and the compute step are one trace,
//! each span carrying the call's request id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use switchyard_common::tracing_setup::{self, LogFormat, TracingArgs};
use switchyard_integration_tests::{TestCluster, hidden_states, small_model};

/// A span as received, with the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<String> {
        self.span.attributes.iter().find(|attribute| attribute.key == key).and_then(value_text)
    }
}

fn value_text(attribute: &KeyValue) -> Option<String> {
    match attribute.value.as_ref()?.value.as_ref()? {
        Value::StringValue(text) => Some(text.clone()),
        Value::IntValue(number) => Some(number.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The collector stand-in: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("collector lock");
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans.resource.unwrap_or_default();
            let service = resource.attributes.iter().find(|attribute| attribute.key == "service.name");
            let service = service.and_then(value_text).unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| Received { service: service.clone(), span }));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    fn named(&self, name: &str) -> Vec<Received> {
        let spans = self.spans.lock().expect("collector lock");
        spans.iter().filter(|received| received.span.name == name).cloned().collect()
    }

    /// Waits for spans named `name` (the processes export in batches).
    async fn wait_for(&self, name: &str) -> Vec<Received> {
        for _ in 0..300 {
            let spans = self.named(name);
            if !spans.is_empty() {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no {name:?} span reached the collector within 30 s: {:#?}", self.spans.lock().expect("lock"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_forward_is_one_trace_from_the_client_through_the_worker_to_the_compute_step() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the collector");
    let endpoint = format!("http://{}", listener.local_addr().expect("collector address"));
    let server = tonic::transport::Server::builder().add_service(TraceServiceServer::new(collector.clone()));
    tokio::spawn(server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));

    let tracing = TracingArgs { log_format: LogFormat::Text, otlp_endpoint: Some(endpoint) };
    let spans =
        tracing_setup::init_tracing(&tracing, "switchyard-client", tracing_setup::SERVER_LOGS).expect("exporter");
    let mut cluster = TestCluster::start(small_model(8.0), 1, |config| {
        config.tracing = tracing.clone();
        // The only worker: no other to hand its experts to before it stops.
        config.worker_args.extend(["--drain-timeout-ms".into(), "0".into()]);
    })
    .await;
    cluster.client.forward(0, &hidden_states(16, 256, 1)).await.expect("forward");

    // Both ends flush what they have not exported yet as they stop.
    tokio::task::spawn_blocking(move || drop(spans)).await.expect("client spans flushed");
    assert!(cluster.processes.workers[0].terminate(Duration::from_secs(20)).await, "the worker stops on SIGTERM");

    let calls = collector.wait_for("layer_forward").await;
    let [call] = &calls[..] else { panic!("one layer call, one span: {calls:#?}") };
    assert_eq!(call.service, "switchyard-client");
    let request_id = call.attribute("request_id").expect("the call's request id");
    assert_eq!(call.attribute("layer").as_deref(), Some("0"));

    let requests: Vec<Received> = collector
        .wait_for("forward")
        .await
        .into_iter()
        .filter(|received| received.attribute("request_id").as_ref() == Some(&request_id))
        .collect();
    assert!(!requests.is_empty(), "the worker's request span carries request id {request_id}");
    for request in &requests {
        assert_eq!(request.service, "switchyard-worker");
        assert_eq!(request.span.trace_id, call.span.trace_id, "the worker's span is in the client's trace");
        assert_eq!(request.span.parent_span_id, call.span.span_id, "and a child of the client's call");
        assert_eq!(request.attribute("layer").as_deref(), Some("0"));
        assert!(request.attribute("worker").is_some_and(|worker| !worker.is_empty()));
    }

    let by_id: HashMap<&[u8], &Received> =
        requests.iter().map(|request| (request.span.span_id.as_slice(), request)).collect();
    let steps: Vec<Received> = collector
        .wait_for("expert_batch")
        .await
        .into_iter()
        .filter(|step| step.attribute("request_ids").is_some_and(|ids| ids.split(',').any(|id| id == request_id)))
        .collect();
    assert!(!steps.is_empty(), "compute steps name request id {request_id}");
    for step in &steps {
        assert_eq!(step.span.trace_id, call.span.trace_id, "the compute step is in the client's trace");
        assert!(by_id.contains_key(step.span.parent_span_id.as_slice()), "and a child of the worker's request span");
        assert!(step.attribute("expert").is_some() && step.attribute("tokens").is_some());
    }
}
