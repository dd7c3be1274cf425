//! The coordinator's Prometheus metrics.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::sync::atomic::AtomicU64;
use switchyard_common::grpc_metrics::GrpcServerMetrics;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Default)]
pub struct CoordinatorMetrics {
    pub live_workers: Gauge,
    /// `--max-workers`: registrations past it are refused.
    pub max_workers: Gauge,
    pub table_version: Gauge,
    pub placed_experts: Gauge,
    pub worker_expirations: Counter,
    /// LoadExperts orders by outcome (`ok`, `failed`).
    pub load_orders: Family<OutcomeLabels, Counter>,
    /// Experts loaded onto workers (placements made), and unloaded after their grace period.
    pub experts_loaded: Counter,
    pub experts_unloaded: Counter,
    /// Experts the published table routes to each worker: one series per live worker.
    pub worker_placed_experts: Family<WorkerLabels, Gauge>,
    /// The busiest worker's measured load over the mean (1 is even), when balancing by traffic.
    pub load_imbalance: Gauge<f64, AtomicU64>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

impl CoordinatorMetrics {
    /// Every series the coordinator serves: its own, its gRPC server's (`grpc`), the process's.
    pub fn registry(&self, grpc: &GrpcServerMetrics) -> Arc<Registry> {
        let mut registry = Registry::default();
        grpc.register(&mut registry);
        switchyard_common::process_metrics::register(&mut registry, "coordinator");
        let sub = registry.sub_registry_with_prefix("switchyard_coordinator");
        sub.register("live_workers", "Workers whose heartbeats are current", self.live_workers.clone());
        sub.register(
            "max_workers",
            "Most workers registered at once (--max-workers); registrations past it are refused",
            self.max_workers.clone(),
        );
        sub.register("table_version", "Version of the published routing table", self.table_version.clone());
        sub.register("placed_experts", "Experts the published table routes to a worker", self.placed_experts.clone());
        sub.register("worker_expirations", "Workers removed for missing heartbeats", self.worker_expirations.clone());
        sub.register("load_orders", "LoadExperts orders sent to workers, by outcome", self.load_orders.clone());
        sub.register("experts_loaded", "Experts loaded onto workers by placement", self.experts_loaded.clone());
        sub.register("experts_unloaded", "Experts unloaded after their grace period", self.experts_unloaded.clone());
        sub.register(
            "load_imbalance",
            "The busiest worker's share of the measured expert traffic over the mean (1 is even)",
            self.load_imbalance.clone(),
        );
        sub.register(
            "worker_placed_experts",
            "Experts the published routing table routes to each worker",
            self.worker_placed_experts.clone(),
        );
        Arc::new(registry)
    }
}
