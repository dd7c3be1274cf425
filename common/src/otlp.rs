//! OpenTelemetry: the INFO spans exported over OTLP/gRPC, and the W3C trace context that joins a
//! call's spans across processes (`traceparent` in the gRPC metadata), so that a collector shows
//! one trace per layer call: client, worker, compute step.
//!
//! Nothing here costs anything unless an exporter was installed ([`crate::tracing_setup`]): without
//! one, spans have no trace context to send and an incoming one is ignored.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Where and as what this process exports its spans.
#[derive(Debug, Clone)]
pub struct OtlpExport {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// `service.name` of this process's spans, unless `OTEL_SERVICE_NAME` says otherwise.
    pub service_name: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("otlp endpoint {endpoint:?}: {reason}")]
    Exporter { endpoint: String, reason: String },
}

/// How long an export may take before it is given up (the collector is down or slow).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Spans go to `export.endpoint` in batches (`OTEL_BSP_*` tune them). Call within a Tokio runtime:
/// the gRPC channel's connection task runs on it.
pub(crate) fn tracer_provider(export: &OtlpExport) -> Result<SdkTracerProvider, OtlpError> {
    // The collector is a local agent or an in-cluster service: plaintext gRPC, as OTLP's default
    // port 4317 serves it. Without the scheme the exporter would assume https.
    if !export.endpoint.starts_with("http://") {
        return Err(OtlpError::Exporter {
            endpoint: export.endpoint.clone(),
            reason:
                "--otlp-endpoint must be http://HOST:PORT (OTLP/gRPC in plaintext, e.g. http://otel-collector:4317)"
                    .into(),
        });
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(export.endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|error| OtlpError::Exporter { endpoint: export.endpoint.clone(), reason: error.to_string() })?;
    let resource = opentelemetry_sdk::Resource::builder();
    let resource = match std::env::var_os("OTEL_SERVICE_NAME") {
        Some(_) => resource,
        None => resource.with_service_name(export.service_name),
    };
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// The tracing layer that hands every span to `provider`.
pub(crate) fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("switchyard"))
}

/// Writes `span`'s trace context into `metadata`, for the server's spans to join.
pub fn inject(span: &tracing::Span, metadata: &mut MetadataMap) {
    let context = span.context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
    }
}

/// The trace a caller's metadata says a request belongs to, if any.
#[derive(Debug, Clone, Default)]
pub struct RemoteParent(Option<opentelemetry::Context>);

impl RemoteParent {
    pub fn from_metadata(metadata: &MetadataMap) -> Self {
        let context = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
        Self(context.span().span_context().is_remote().then_some(context))
    }

    /// Makes `span` a child of the caller's span (a no-op without one, or without an exporter).
    pub fn adopt(&self, span: &tracing::Span) {
        if let Some(context) = &self.0 {
            // Fails only where no OpenTelemetry layer is installed: nothing to join then.
            let _ = span.set_parent(context.clone());
        }
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_without_http_is_refused_by_name() {
        for endpoint in ["otel-collector:4317", "https://otel-collector:4317"] {
            let export = OtlpExport { endpoint: endpoint.into(), service_name: "test" };
            let error = tracer_provider(&export).expect_err(endpoint).to_string();
            assert!(error.contains(endpoint) && error.contains("http://HOST:PORT"), "{error}");
        }
    }

    #[test]
    fn a_trace_context_crosses_the_metadata_and_nothing_is_sent_without_one() {
        let mut metadata = MetadataMap::new();
        inject(&tracing::Span::current(), &mut metadata);
        assert!(metadata.is_empty(), "no exporter, no span context: {metadata:?}");
        assert!(RemoteParent::from_metadata(&metadata).0.is_none());

        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        metadata.insert("traceparent", traceparent.parse().expect("ascii"));
        let parent = RemoteParent::from_metadata(&metadata).0.expect("a remote parent");
        let span = parent.span();
        let context = span.span_context();
        assert_eq!(context.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled());

        let mut echoed = MetadataMap::new();
        TraceContextPropagator::new().inject_context(&parent, &mut MetadataInjector(&mut echoed));
        assert_eq!(echoed.get("traceparent").and_then(|value| value.to_str().ok()), Some(traceparent));

        metadata.insert("traceparent", "00-not-a-trace".parse().expect("ascii"));
        assert!(RemoteParent::from_metadata(&metadata).0.is_none(), "a malformed traceparent is ignored");
    }

    #[test]
    fn a_span_that_adopts_its_caller_s_trace_passes_it_on_to_its_own_calls() {
        use tracing_subscriber::layer::SubscriberExt;
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry().with(layer(&provider));
        let mut incoming = MetadataMap::new();
        incoming
            .insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().expect("ascii"));
        tracing::subscriber::with_default(subscriber, || {
            let traceparent = |span: &tracing::Span| {
                let mut outgoing = MetadataMap::new();
                inject(span, &mut outgoing);
                outgoing.get("traceparent").and_then(|value| value.to_str().ok()).map(str::to_owned)
            };
            let joined = tracing::info_span!("forward");
            RemoteParent::from_metadata(&incoming).adopt(&joined);
            let sent = traceparent(&joined).expect("a span in a trace sends its context");
            assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "the caller's trace: {sent}");
            assert!(!sent.contains("00f067aa0ba902b7"), "as its own span, the caller's child: {sent}");

            let own = traceparent(&tracing::info_span!("forward")).expect("a trace of its own");
            assert!(!own.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{own}");
        });
    }

    #[test]
    fn the_extractor_lists_the_text_keys_only() {
        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", "00-x".parse().expect("ascii"));
        metadata.insert("tracestate", "a=b".parse().expect("ascii"));
        metadata.insert_bin("context-bin", tonic::metadata::MetadataValue::from_bytes(b"\x01"));
        let extractor = MetadataExtractor(&metadata);
        let mut keys = extractor.keys();
        keys.sort_unstable();
        assert_eq!(keys, ["traceparent", "tracestate"]);
    }
}
