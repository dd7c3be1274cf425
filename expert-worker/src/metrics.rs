//! The worker's Prometheus metrics. Label sets are bounded: series are per worker by default; the
//! per-expert series (`--per-expert-metrics`) are opt-in, since a 48-layer, 128-expert model would
//! make thousands of them.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use switchyard_common::grpc_metrics::GrpcServerMetrics;

/// Cheap to clone: every field is a handle to shared atomics.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    pub admitted_tokens: Counter,
    pub rejected_tokens: Counter,
    pub requests: Counter,
    pub resident_experts: Gauge,
    pub queued_tokens: Gauge,
    /// Expert batches computed in one grouped product with others of their stack.
    pub grouped_batches: Counter,
    /// Bytes of the steps' uploads (on a GPU, what each step copies to the device).
    pub staged_bytes: Counter,
    batch_tokens: Histogram,
    queue_wait_seconds: Histogram,
    compute_seconds: Histogram,
    /// Admitted and rejected tokens per expert, only with `--per-expert-metrics`.
    per_expert: Option<PerExpert>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExpertLabels {
    pub layer: u32,
    pub expert: u32,
}

#[derive(Debug, Clone, Default)]
struct PerExpert {
    admitted_tokens: Family<ExpertLabels, Counter>,
    rejected_tokens: Family<ExpertLabels, Counter>,
}

impl WorkerMetrics {
    pub fn new() -> Self {
        Self {
            admitted_tokens: Counter::default(),
            rejected_tokens: Counter::default(),
            requests: Counter::default(),
            resident_experts: Gauge::default(),
            queued_tokens: Gauge::default(),
            grouped_batches: Counter::default(),
            staged_bytes: Counter::default(),
            batch_tokens: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            queue_wait_seconds: Histogram::new(exponential_buckets(1e-6, 2.0, 24)),
            compute_seconds: Histogram::new(exponential_buckets(1e-5, 2.0, 22)),
            per_expert: None,
        }
    }

    /// Also keeps per-expert series.
    pub fn with_per_expert_series(mut self) -> Self {
        self.per_expert = Some(PerExpert::default());
        self
    }

    /// Counts `tokens` admitted (or rejected) for one expert, when per-expert series are on.
    pub fn observe_expert(&self, layer: u32, expert: u32, tokens: u64, admitted: bool) {
        if let Some(per_expert) = &self.per_expert {
            let family = if admitted { &per_expert.admitted_tokens } else { &per_expert.rejected_tokens };
            family.get_or_create(&ExpertLabels { layer, expert }).inc_by(tokens);
        }
    }

    /// Registers every metric under the `switchyard_worker_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("switchyard_worker");
        registry.register("admitted_tokens", "Token rows admitted into expert queues", self.admitted_tokens.clone());
        registry.register(
            "rejected_tokens",
            "Token rows refused because an expert queue was full",
            self.rejected_tokens.clone(),
        );
        registry.register("requests", "Forward requests received", self.requests.clone());
        registry.register("resident_experts", "Experts loaded on this worker", self.resident_experts.clone());
        registry.register("queued_tokens", "Token rows waiting in all expert queues", self.queued_tokens.clone());
        registry.register("batch_tokens", "Rows per merged expert forward", self.batch_tokens.clone());
        registry.register(
            "grouped_batches",
            "Merged expert forwards computed in one grouped product with others of their stack (--grouped-experts)",
            self.grouped_batches.clone(),
        );
        registry.register(
            "staged_bytes",
            "Bytes of the steps' uploads: token rows (a token-major request's once a step), and where a step copies \
             them to its device also the token-major parts' indices and gate weights and the grouped products' row \
             ends, each run aligned to 16 bytes",
            self.staged_bytes.clone(),
        );
        registry.register("queue_wait_seconds", "Time rows waited in an expert queue", self.queue_wait_seconds.clone());
        registry.register("compute_seconds", "Time of one merged expert forward", self.compute_seconds.clone());
        if let Some(per_expert) = &self.per_expert {
            registry.register(
                "expert_admitted_tokens",
                "Token rows admitted per expert",
                per_expert.admitted_tokens.clone(),
            );
            registry.register(
                "expert_rejected_tokens",
                "Token rows refused per expert",
                per_expert.rejected_tokens.clone(),
            );
        }
    }

    pub fn observe_batch(&self, tokens: usize, compute: Duration) {
        self.batch_tokens.observe(tokens as f64);
        self.compute_seconds.observe(compute.as_secs_f64());
    }

    pub fn observe_queue_wait(&self, wait: Duration) {
        self.queue_wait_seconds.observe(wait.as_secs_f64());
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A registry holding `metrics`, the gRPC server's (`grpc`) and the process's.
pub fn registry_with(metrics: &WorkerMetrics, grpc: &GrpcServerMetrics) -> Arc<Registry> {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    grpc.register(&mut registry);
    switchyard_common::process_metrics::register(&mut registry, "worker");
    Arc::new(registry)
}
