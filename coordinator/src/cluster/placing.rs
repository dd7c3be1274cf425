//! Reconcile rounds: plan where experts go (by size, or by measured traffic once balancing has
//! some), order the loads that are missing, apply each outcome as it lands, and unload what the
//! table no longer routes once its grace has passed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_model::ExpertId;

use super::{Cluster, State};
use crate::control::{ControlError, ExpertLoad, WorkerControl};
use crate::metrics::OutcomeLabels;
use crate::placement::{self, Goal, Placement, WorkerId, WorkerSlot, holders};

/// The longest wait before a worker whose loads keep failing is asked again.
const MAX_LOAD_RETRY_DELAY: Duration = Duration::from_secs(60);

/// One load to issue.
#[derive(Debug)]
pub(super) struct LoadOrder {
    pub(super) worker: WorkerId,
    endpoint: String,
    pub(super) experts: BTreeSet<ExpertId>,
}

impl<C: WorkerControl> Cluster<C> {
    /// Folds the traffic measured so far into the balance the next plans follow (EPLB).
    pub fn rebalance_by_traffic(&self) {
        let rates = self.traffic().rates(Instant::now()).clone();
        if rates.values().all(|rate| *rate <= 0.0) {
            return;
        }
        let base: BTreeMap<ExpertId, usize> =
            self.config.model.expert_keys().map(|expert| (expert, self.config.replicas_of(expert))).collect();
        let mut state = self.lock();
        let workers = state.workers.values().filter(|worker| !worker.draining).count();
        let balance = self.balancer.balance(&rates, &base, workers);
        let imbalance = balance.imbalance(state.published.iter());
        tracing::info!(
            imbalance,
            replicas = balance.replicas.values().sum::<usize>(),
            "balancing placement by measured traffic"
        );
        self.metrics.load_imbalance.set(imbalance);
        state.balance = Some(balance);
        drop(state);
        self.wake.notify_one();
    }

    /// Plans where experts go and returns the loads to order (each worker marked as loading).
    pub(super) fn plan_round(&self) -> Vec<LoadOrder> {
        let mut state = self.lock();
        if self.expire_silent(&mut state) {
            self.republish(&mut state);
        }
        if !state.placed_once && (state.workers.len() < self.config.min_workers || self.awaiting_rejoins(&state)) {
            return Vec::new();
        }
        let slots: Vec<WorkerSlot> = state
            .workers
            .values()
            .filter(|worker| !worker.draining)
            .map(|worker| WorkerSlot {
                id: worker.id.clone(),
                parameter_room: worker.memory_bytes / worker.resident_dtype.element_size() as u64,
                compute: worker.compute_gflops,
                resident: worker.resident.clone(),
            })
            .collect();
        let experts: Vec<ExpertId> = self.config.model.expert_keys().collect();
        // The first plan adopts what workers already hold (a restarted coordinator): nothing moves.
        let current = if state.placed_once { state.target.clone() } else { resident_placement(&state) };
        let model = &self.config.model;
        let parameters_of = |expert: ExpertId| model.expert_parameters_of(expert.expert);
        let base_replicas = |expert: ExpertId| self.config.replicas_of(expert);
        let plan = match &state.balance {
            None => placement::plan(&experts, Goal::by_size(&parameters_of, &base_replicas), &slots, &current),
            Some(balance) => {
                // What a replica costs its worker: the tokens per second it takes times the work
                // each token costs (shared experts may be larger). The rates come from workers'
                // counters, outside input: one replica's load is bounded so that a worker's sum
                // over every expert (it holds one replica of each at most) cannot wrap.
                let load_ceiling = u64::MAX / experts.len().max(1) as u64;
                let load_of = |expert: ExpertId| {
                    let rate = balance.per_replica_rate.get(&expert).copied().unwrap_or(0.0);
                    ((rate * parameters_of(expert) as f64) as u64).min(load_ceiling)
                };
                let replicas_of = |expert: ExpertId| {
                    balance.replicas.get(&expert).copied().unwrap_or(self.config.replicas_of(expert))
                };
                let goal = Goal { parameters_of: &parameters_of, load_of: &load_of, replicas_of: &replicas_of };
                let plan = placement::plan(&experts, goal, &slots, &current);
                self.metrics.load_imbalance.set(balance.imbalance(plan.placement.iter()));
                plan
            }
        };
        if plan.unplaced.len() != state.unplaced {
            state.unplaced = plan.unplaced.len();
            match (plan.unplaced.len(), slots.len()) {
                (0, _) => tracing::info!("every expert has a worker again"),
                (unplaced, 0) => tracing::warn!(unplaced, "no live workers: no expert can be served"),
                (unplaced, workers) => tracing::warn!(unplaced, workers, "not enough worker memory for every expert"),
            }
        }
        state.target = plan.placement;
        state.placed_once = true;
        let now = Instant::now();
        let State { workers, target, .. } = &mut *state;
        let orders = workers
            .values_mut()
            .filter_map(|worker| {
                let assigned: BTreeSet<ExpertId> = target
                    .iter()
                    .filter(|(_, owners)| owners.contains(&worker.id))
                    .map(|(expert, _)| *expert)
                    .collect();
                let missing = assigned.difference(&worker.resident).next().is_some();
                let backing_off = worker.retry_load_after.is_some_and(|after| now < after);
                if !missing || backing_off || worker.loading {
                    return None;
                }
                worker.loading = true;
                Some(LoadOrder { worker: worker.id.clone(), endpoint: worker.endpoint.clone(), experts: assigned })
            })
            .collect();
        self.republish(&mut state);
        orders
    }

    /// Before the first placement, while workers that hold experts are rejoining a restarted
    /// coordinator: wait (up to the heartbeat timeout) for the holders of the rest, so that
    /// nothing is loaded twice.
    fn awaiting_rejoins(&self, state: &State) -> bool {
        let held: BTreeSet<ExpertId> =
            state.workers.values().flat_map(|worker| worker.resident.iter().copied()).collect();
        !held.is_empty()
            && self.config.model.expert_keys().any(|expert| !held.contains(&expert))
            && self.started.elapsed() < self.config.heartbeat_timeout
    }

    pub(super) async fn load_owned(self: Arc<Self>, order: LoadOrder) {
        self.load(order).await;
    }

    pub(super) async fn unload_owned(self: Arc<Self>, unloads: Vec<(String, Vec<ExpertId>)>) {
        self.unload(unloads).await;
    }

    pub(super) async fn load(&self, order: LoadOrder) {
        let load = ExpertLoad {
            model: &self.config.model,
            experts: order.experts.iter().copied().collect(),
            queue_limit_tokens: self.config.queue_limit_tokens,
            shared_queue_limit_tokens: self.config.max_batch_tokens,
        };
        let result = self.control.load(&order.endpoint, load).await;
        self.finish_load(order, result);
        self.wake.notify_one();
    }

    /// Applies the outcome of one load and republishes.
    pub(super) fn finish_load(&self, order: LoadOrder, result: Result<(), ControlError>) {
        let mut state = self.lock();
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.metrics.load_orders.get_or_create(&OutcomeLabels { outcome }).inc();
        let heartbeat_interval = self.config.heartbeat_interval;
        let Some(worker) = state.workers.get_mut(&order.worker) else {
            return;
        };
        worker.loading = false;
        match result {
            Ok(()) => {
                let new = order.experts.iter().filter(|expert| !worker.resident.contains(expert)).count();
                self.metrics.experts_loaded.inc_by(new as u64);
                worker.resident.extend(order.experts.iter().copied());
                worker.load_failures = 0;
                worker.retry_load_after = None;
            }
            Err(error) => {
                worker.load_failures += 1;
                let doublings = worker.load_failures.min(10) - 1;
                let retry_in = (heartbeat_interval * 2u32.pow(doublings)).min(MAX_LOAD_RETRY_DELAY);
                worker.retry_load_after = Some(Instant::now() + retry_in);
                tracing::error!(worker_id = %order.worker, endpoint = %order.endpoint, %error, retry_in_ms = retry_in.as_millis() as u64, "worker failed to load its experts");
            }
        }
        self.republish(&mut state);
    }

    pub(super) async fn unload(&self, unloads: Vec<(String, Vec<ExpertId>)>) {
        let unloads = unloads.into_iter().map(|(endpoint, experts)| async move {
            if let Err(error) = self.control.unload(&endpoint, experts).await {
                tracing::warn!(%endpoint, %error, "unloading retired experts failed");
            }
        });
        futures::future::join_all(unloads).await;
    }

    /// Experts workers hold that neither the plan nor the table gives them any more, once their
    /// grace has passed: (endpoint, experts) to unload.
    pub(super) fn due_unloads(&self) -> Vec<(String, Vec<ExpertId>)> {
        let mut state = self.lock();
        let state = &mut *state;
        if !state.placed_once {
            // Before the first plan every held expert looks surplus: it is only not adopted yet.
            return Vec::new();
        }
        let now = Instant::now();
        let mut still_retired = BTreeMap::new();
        let mut due: Vec<(String, Vec<ExpertId>)> = Vec::new();
        for worker in state.workers.values_mut() {
            if worker.loading {
                continue;
            }
            let surplus: Vec<ExpertId> = worker
                .resident
                .iter()
                .filter(|expert| {
                    !holders(&state.target, expert).contains(&worker.id)
                        && !holders(&state.published, expert).contains(&worker.id)
                })
                .copied()
                .collect();
            let mut unload = Vec::new();
            for expert in surplus {
                let since = state.retired.get(&(worker.id.clone(), expert)).copied().unwrap_or(now);
                if now.duration_since(since) >= self.config.unload_grace {
                    worker.resident.remove(&expert);
                    self.metrics.experts_unloaded.inc();
                    unload.push(expert);
                } else {
                    still_retired.insert((worker.id.clone(), expert), since);
                }
            }
            if !unload.is_empty() {
                due.push((worker.endpoint.clone(), unload));
            }
        }
        state.retired = still_retired;
        due
    }
}

/// Each expert's holders among the live workers that are not draining: what a restarted
/// coordinator adopts.
fn resident_placement(state: &State) -> Placement {
    let mut placement = Placement::new();
    for worker in state.workers.values().filter(|worker| !worker.draining) {
        for expert in &worker.resident {
            placement.entry(*expert).or_default().push(worker.id.clone());
        }
    }
    placement
}
