//! The coordinator's Prometheus metrics.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Default)]
pub struct CoordinatorMetrics {
    pub live_workers: Gauge,
    pub table_version: Gauge,
    pub placed_experts: Gauge,
    pub worker_expirations: Counter,
}

impl CoordinatorMetrics {
    pub fn registry(&self) -> Arc<Registry> {
        let mut registry = Registry::default();
        let sub = registry.sub_registry_with_prefix("switchyard_coordinator");
        sub.register("live_workers", "Workers whose heartbeats are current", self.live_workers.clone());
        sub.register("table_version", "Version of the published routing table", self.table_version.clone());
        sub.register("placed_experts", "Experts the published table routes to a worker", self.placed_experts.clone());
        sub.register("worker_expirations", "Workers removed for missing heartbeats", self.worker_expirations.clone());
        Arc::new(registry)
    }
}
