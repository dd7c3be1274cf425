//! The routing table: recomputed from the plan and what workers hold, published as a new version
//! only when it changed, and only ever routing an expert to live workers that hold it.

use std::collections::BTreeSet;
use std::sync::Arc;

use switchyard_model::ExpertId;
use switchyard_proto::v1;

use super::{Cluster, State, WorkerRecord};
use crate::control::WorkerControl;
use crate::metrics::WorkerLabels;
use crate::placement::{Placement, WorkerId, holders};

impl<C: WorkerControl> Cluster<C> {
    /// Recomputes what the table routes and publishes a new version when it changed. The invariant,
    /// enforced here once: the table routes an expert only to live workers that hold it.
    pub(super) fn republish(&self, state: &mut State) {
        if !state.placed_once {
            return;
        }
        let published = routable(state);
        if published != state.published {
            state.published = published;
            self.publish(state);
        }
    }

    fn publish(&self, state: &State) {
        let routes = self
            .config
            .model
            .expert_keys()
            .map(|key| v1::ExpertRoute {
                expert: Some(key.into()),
                endpoints: holders(&state.published, &key)
                    .iter()
                    .filter_map(|owner| state.workers.get(owner))
                    .map(|worker| worker.endpoint.clone())
                    .collect(),
            })
            .collect();
        let version = self.table.borrow().version + 1;
        let table = v1::RoutingTable {
            version,
            epoch: self.epoch,
            model: Some(self.config.model.to_proto()),
            routes,
            queue_limit_tokens: self.config.queue_limit_tokens,
            max_batch_tokens: self.config.max_batch_tokens,
        };
        let placed = state.published.values().filter(|owners| !owners.is_empty()).count();
        tracing::info!(version, placed, workers = state.workers.len(), "routing table published");
        self.metrics.table_version.set(version as i64);
        self.metrics.placed_experts.set(placed as i64);
        // Only live workers keep a series, so the label set stays bounded by the cluster size.
        self.metrics.worker_placed_experts.clear();
        for worker in state.workers.values() {
            let routed = state.published.values().filter(|owners| owners.contains(&worker.id)).count();
            self.metrics
                .worker_placed_experts
                .get_or_create(&WorkerLabels { worker: worker.id.to_string() })
                .set(routed as i64);
        }
        self.table.send_replace(Arc::new(table));
    }
}

/// What the table may route: each expert's planned holders that hold it already, else (while it
/// moves) the live workers still holding it, those not draining first.
fn routable(state: &State) -> Placement {
    let holds =
        |id: &WorkerId, expert: &ExpertId| state.workers.get(id).is_some_and(|worker| worker.resident.contains(expert));
    let held = state.workers.values().flat_map(|worker| worker.resident.iter());
    let experts: BTreeSet<&ExpertId> = state.target.keys().chain(held).collect();
    let mut published = Placement::new();
    for expert in experts {
        let owners = holders(&state.target, expert);
        let mut routed: Vec<WorkerId> = owners.iter().filter(|owner| holds(owner, expert)).cloned().collect();
        if routed.is_empty() {
            let mut fallback: Vec<&WorkerRecord> =
                state.workers.values().filter(|worker| worker.resident.contains(expert)).collect();
            fallback.sort_by_key(|worker| worker.draining);
            routed = fallback.into_iter().map(|worker| worker.id.clone()).collect();
        }
        if !routed.is_empty() {
            published.insert(*expert, routed);
        }
    }
    published
}
