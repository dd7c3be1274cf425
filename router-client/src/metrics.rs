//! The client library's Prometheus metrics: the time breakdown of every layer call as histograms
//! (one series per phase), bytes sent and received, calls and failures by gRPC code. Label sets are
//! bounded by the phase names, two directions, two byte kinds and the gRPC codes. A serving process
//! registers [`ClientMetrics::register`] in its own registry; `switchyard loadtest --metrics-listen`
//! serves them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::client::LayerOutput;
use crate::error::ClientError;
use crate::timing::TimeBreakdown;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// `sent` or `received`.
    pub direction: &'static str,
    /// `payload` (tensor bytes) or `message` (encoded protobuf + gRPC prefix).
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

/// Cheap to clone: every field is a handle to shared atomics.
#[derive(Debug, Clone)]
pub struct ClientMetrics {
    calls: Counter,
    failures: Family<CodeLabels, Counter>,
    throttled: Counter,
    wall_seconds: Histogram,
    phase_seconds: Family<PhaseLabels, Histogram>,
    bytes: Family<BytesLabels, Counter>,
    tokens: Counter,
}

fn seconds_histogram() -> Histogram {
    // 1 µs to ~8 s.
    Histogram::new(exponential_buckets(1e-6, 2.0, 24))
}

impl Default for ClientMetrics {
    fn default() -> Self {
        Self {
            calls: Counter::default(),
            failures: Family::default(),
            throttled: Counter::default(),
            wall_seconds: seconds_histogram(),
            phase_seconds: Family::new_with_constructor(seconds_histogram),
            bytes: Family::default(),
            tokens: Counter::default(),
        }
    }
}

impl ClientMetrics {
    /// Counts one layer call.
    pub fn observe(&self, output: &Result<LayerOutput, ClientError>) {
        let output = match output {
            Ok(output) => output,
            Err(error) => {
                self.failures.get_or_create(&CodeLabels { code: format!("{:?}", error.code()) }).inc();
                if matches!(error, ClientError::Throttled { .. }) {
                    self.throttled.inc();
                }
                return;
            }
        };
        self.calls.inc();
        self.tokens.inc_by(output.routing.tokens as u64);
        self.wall_seconds.observe(output.timing.wall.as_secs_f64());
        for (phase, time) in TimeBreakdown::PHASES.iter().zip(output.timing.phases()) {
            self.phase_seconds.get_or_create(&PhaseLabels { phase }).observe(time.as_secs_f64());
        }
        let bytes = output.bytes;
        for (direction, kind, count) in [
            ("sent", "payload", bytes.payload_sent),
            ("sent", "message", bytes.message_sent),
            ("received", "payload", bytes.payload_received),
            ("received", "message", bytes.message_received),
        ] {
            self.bytes.get_or_create(&BytesLabels { direction, kind }).inc_by(count);
        }
    }

    /// Adds these metrics under `switchyard_client_` to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("switchyard_client");
        sub.register("layer_calls", "Layer calls answered", self.calls.clone());
        sub.register("layer_call_failures", "Layer calls that failed, by gRPC code", self.failures.clone());
        sub.register(
            "throttled_calls",
            "Layer calls the client refused itself, sending nothing, because a worker refused most of what it was sent",
            self.throttled.clone(),
        );
        sub.register("tokens", "Tokens sent through layer calls", self.tokens.clone());
        sub.register(
            "layer_call_seconds",
            "Wall time of a layer call, as the caller measured it",
            self.wall_seconds.clone(),
        );
        sub.register(
            "phase_seconds",
            "Time of each phase of a layer call on its critical path (they add up to the wall time)",
            self.phase_seconds.clone(),
        );
        sub.register("bytes", "Bytes of layer calls by direction and kind", self.bytes.clone());
    }

    /// Calls answered so far (for tests and the load tester).
    pub fn calls(&self) -> u64 {
        self.calls.get()
    }
}
