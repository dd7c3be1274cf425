//! [`Cluster`]: the coordinator's logic as a plain struct, tested without a network.
//!
//! Membership (register, heartbeat, expiry) updates the state under a short lock. One reconcile
//! loop owns every change of placement, so changes never interleave: it plans
//! ([`crate::placement::plan`]), tells workers to load their new experts (outside the lock), then
//! publishes a new routing table version that only names experts already loaded, and finally
//! unloads experts a worker no longer serves once a grace period has passed, so clients still on
//! the previous table are not cut off.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use switchyard_model::{ExpertId, ModelSpec, WeightDtype};
use switchyard_proto::PROTOCOL_VERSION;
use switchyard_proto::v1;
use tokio::sync::{Notify, watch};

use crate::control::{ControlError, ExpertLoad, WorkerControl};
use crate::error::CoordinatorError;
use crate::metrics::{CoordinatorMetrics, OutcomeLabels, WorkerLabels};
use crate::placement::{self, Placement, WorkerId, WorkerSlot};

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub model: ModelSpec,
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is removed and its experts placed on the survivors.
    pub heartbeat_timeout: Duration,
    /// Workers to wait for before the first placement (so experts do not all land on the first).
    pub min_workers: usize,
    /// Tokens one routed expert's queue admits: the expert capacity of the largest batch clients
    /// send (the largest batch itself when the model is dropless).
    pub queue_limit_tokens: u32,
    /// The largest batch a client sends; also a shared expert's queue limit (every token goes there).
    pub max_batch_tokens: u32,
    /// How long a worker keeps serving an expert after the table moved it elsewhere.
    pub unload_grace: Duration,
}

/// What a worker says about itself when it registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub protocol_version: u32,
    pub name: String,
    pub endpoint: String,
    pub device: String,
    pub memory_bytes: u64,
    /// The dtype the worker was told to keep experts in (`--dtype`); `None`: the model's default.
    pub dtype: Option<WeightDtype>,
    pub loaded_experts: Vec<ExpertId>,
}

#[derive(Debug, Clone)]
pub struct WorkerRecord {
    pub id: WorkerId,
    pub name: String,
    pub endpoint: String,
    pub device: String,
    pub memory_bytes: u64,
    /// The dtype its experts are resident in, so what its memory holds.
    pub resident_dtype: WeightDtype,
    /// Experts the worker holds (reported at registration, then what we told it to load).
    pub resident: BTreeSet<ExpertId>,
    pub last_heartbeat: Instant,
    pub queued_tokens: u64,
    pub tokens_served: u64,
    /// Consecutive failed loads, and when the next may be tried (doubling, up to a minute).
    pub load_failures: u32,
    pub retry_load_after: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    workers: BTreeMap<WorkerId, WorkerRecord>,
    /// The placement of the published table.
    placement: Placement,
    registrations: u64,
    placed_once: bool,
    /// (worker, expert) pairs the table no longer routes to that worker, and since when.
    retired: BTreeMap<(WorkerId, ExpertId), Instant>,
    /// Unplaced experts at the last round, so the warning is logged on change, not every round.
    unplaced: usize,
}

/// The longest wait before a worker whose loads keep failing is asked again.
const MAX_LOAD_RETRY_DELAY: Duration = Duration::from_secs(60);

/// One load to issue during a reconcile round.
struct LoadOrder {
    worker: WorkerId,
    endpoint: String,
    experts: BTreeSet<ExpertId>,
}

#[derive(Debug)]
pub struct Cluster<C> {
    config: ClusterConfig,
    state: Mutex<State>,
    table: watch::Sender<Arc<v1::RoutingTable>>,
    wake: Notify,
    control: C,
    metrics: CoordinatorMetrics,
}

impl<C: WorkerControl> Cluster<C> {
    pub fn new(config: ClusterConfig, control: C, metrics: CoordinatorMetrics) -> Arc<Self> {
        let empty = v1::RoutingTable {
            version: 0,
            model: Some(config.model.to_proto()),
            routes: Vec::new(),
            queue_limit_tokens: config.queue_limit_tokens,
            max_batch_tokens: config.max_batch_tokens,
        };
        let (table, _) = watch::channel(Arc::new(empty));
        Arc::new(Self { config, state: Mutex::new(State::default()), table, wake: Notify::new(), control, metrics })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a worker (replacing an earlier record with the same endpoint: a restarted worker).
    pub fn register(&self, registration: Registration) -> Result<(WorkerId, Duration), CoordinatorError> {
        if registration.protocol_version != PROTOCOL_VERSION {
            return Err(CoordinatorError::ProtocolMismatch {
                worker: registration.protocol_version,
                coordinator: PROTOCOL_VERSION,
            });
        }
        if registration.endpoint.is_empty() {
            return Err(CoordinatorError::InvalidArgument { field: "endpoint", reason: "must not be empty".into() });
        }
        if registration.memory_bytes == 0 {
            return Err(CoordinatorError::InvalidArgument { field: "memory_bytes", reason: "must be positive".into() });
        }
        let mut state = self.lock();
        state.workers.retain(|_, worker| worker.endpoint != registration.endpoint);
        state.registrations += 1;
        let id = WorkerId(format!("w{}", state.registrations));
        let resident =
            registration.loaded_experts.iter().filter(|key| self.config.model.contains(key)).copied().collect();
        tracing::info!(worker_id = %id, name = %registration.name, endpoint = %registration.endpoint, device = %registration.device, "worker registered");
        state.workers.insert(
            id.clone(),
            WorkerRecord {
                id: id.clone(),
                name: registration.name,
                endpoint: registration.endpoint,
                resident_dtype: self
                    .config
                    .model
                    .resident_dtype(registration.dtype, registration.device.starts_with("cuda")),
                device: registration.device,
                memory_bytes: registration.memory_bytes,
                resident,
                last_heartbeat: Instant::now(),
                queued_tokens: 0,
                tokens_served: 0,
                load_failures: 0,
                retry_load_after: None,
            },
        );
        self.metrics.live_workers.set(state.workers.len() as i64);
        drop(state);
        self.wake.notify_one();
        Ok((id, self.config.heartbeat_interval))
    }

    pub fn heartbeat(
        &self,
        protocol_version: u32,
        worker_id: &str,
        queued_tokens: u64,
        tokens_served: u64,
    ) -> Result<u64, CoordinatorError> {
        if protocol_version != PROTOCOL_VERSION {
            return Err(CoordinatorError::ProtocolMismatch { worker: protocol_version, coordinator: PROTOCOL_VERSION });
        }
        let mut state = self.lock();
        let worker = state
            .workers
            .get_mut(&WorkerId(worker_id.to_owned()))
            .ok_or_else(|| CoordinatorError::UnknownWorker(worker_id.to_owned()))?;
        worker.last_heartbeat = Instant::now();
        worker.queued_tokens = queued_tokens;
        worker.tokens_served = tokens_served;
        Ok(self.table.borrow().version)
    }

    pub fn table(&self) -> Arc<v1::RoutingTable> {
        self.table.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<v1::RoutingTable>> {
        self.table.subscribe()
    }

    pub fn status(&self) -> v1::ClusterStatus {
        let state = self.lock();
        let now = Instant::now();
        let workers = state
            .workers
            .values()
            .map(|worker| {
                let experts: Vec<_> = state
                    .placement
                    .iter()
                    .filter(|(_, owner)| **owner == worker.id)
                    .map(|(expert, _)| *expert)
                    .collect();
                v1::WorkerStatus {
                    worker_id: worker.id.0.clone(),
                    name: worker.name.clone(),
                    endpoint: worker.endpoint.clone(),
                    device: worker.device.clone(),
                    memory_bytes: worker.memory_bytes,
                    assigned_bytes: experts
                        .iter()
                        .map(|key| self.config.model.expert_bytes_of(key.expert, worker.resident_dtype))
                        .sum(),
                    experts: experts.into_iter().map(Into::into).collect(),
                    millis_since_heartbeat: now.duration_since(worker.last_heartbeat).as_millis() as u64,
                    queued_tokens: worker.queued_tokens,
                }
            })
            .collect();
        let unplaced_experts =
            self.config.model.expert_keys().filter(|key| !state.placement.contains_key(key)).map(Into::into).collect();
        v1::ClusterStatus {
            table_version: self.table.borrow().version,
            model: Some(self.config.model.to_proto()),
            workers,
            unplaced_experts,
        }
    }

    /// Reconciles until `shutdown` resolves: on every registration, and every heartbeat interval.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            self.reconcile_once().await;
            tokio::select! {
                () = &mut shutdown => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.config.heartbeat_interval) => {}
            }
        }
    }

    /// One round: expire silent workers, plan, load, publish, unload retired experts.
    pub async fn reconcile_once(&self) {
        let Some((plan, orders)) = self.plan_round() else {
            return;
        };
        let loads = orders.iter().map(|order| {
            let load = ExpertLoad {
                model: &self.config.model,
                experts: order.experts.iter().copied().collect(),
                queue_limit_tokens: self.config.queue_limit_tokens,
                shared_queue_limit_tokens: self.config.max_batch_tokens,
            };
            self.control.load(&order.endpoint, load)
        });
        let results = futures::future::join_all(loads).await;
        let unloads = self.commit_round(plan, orders, results);
        let unloads = unloads.into_iter().map(|(endpoint, experts)| async move {
            if let Err(error) = self.control.unload(&endpoint, experts).await {
                tracing::warn!(%endpoint, %error, "unloading retired experts failed");
            }
        });
        futures::future::join_all(unloads).await;
    }

    fn plan_round(&self) -> Option<(Placement, Vec<LoadOrder>)> {
        let mut state = self.lock();
        let now = Instant::now();
        let timeout = self.config.heartbeat_timeout;
        let expired: Vec<WorkerId> = state
            .workers
            .values()
            .filter(|worker| now.duration_since(worker.last_heartbeat) > timeout)
            .map(|worker| worker.id.clone())
            .collect();
        for id in expired {
            if let Some(worker) = state.workers.remove(&id) {
                tracing::warn!(worker_id = %id, endpoint = %worker.endpoint, "worker missed heartbeats; removing it");
                self.metrics.worker_expirations.inc();
            }
        }
        self.metrics.live_workers.set(state.workers.len() as i64);
        if !state.placed_once && state.workers.len() < self.config.min_workers {
            return None;
        }
        let slots: Vec<WorkerSlot> = state
            .workers
            .values()
            .map(|worker| WorkerSlot {
                id: worker.id.clone(),
                parameter_room: worker.memory_bytes / worker.resident_dtype.element_size() as u64,
                resident: worker.resident.clone(),
            })
            .collect();
        let experts: Vec<ExpertId> = self.config.model.expert_keys().collect();
        let model = &self.config.model;
        let plan =
            placement::plan(&experts, &|expert| model.expert_parameters_of(expert.expert), &slots, &state.placement);
        if plan.unplaced.len() != state.unplaced {
            state.unplaced = plan.unplaced.len();
            match (plan.unplaced.len(), slots.len()) {
                (0, _) => tracing::info!("every expert has a worker again"),
                (unplaced, 0) => tracing::warn!(unplaced, "no live workers: no expert can be served"),
                (unplaced, workers) => tracing::warn!(unplaced, workers, "not enough worker memory for every expert"),
            }
        }
        let orders = state
            .workers
            .values()
            .filter_map(|worker| {
                let assigned: BTreeSet<ExpertId> = plan
                    .placement
                    .iter()
                    .filter(|(_, owner)| **owner == worker.id)
                    .map(|(expert, _)| *expert)
                    .collect();
                let missing = assigned.difference(&worker.resident).next().is_some();
                let backing_off = worker.retry_load_after.is_some_and(|after| now < after);
                (missing && !backing_off).then(|| LoadOrder {
                    worker: worker.id.clone(),
                    endpoint: worker.endpoint.clone(),
                    experts: assigned,
                })
            })
            .collect();
        Some((plan.placement, orders))
    }

    /// Applies the outcome of a round's loads; returns the unloads that are due.
    fn commit_round(
        &self,
        mut plan: Placement,
        orders: Vec<LoadOrder>,
        results: Vec<Result<(), ControlError>>,
    ) -> Vec<(String, Vec<ExpertId>)> {
        let mut state = self.lock();
        for (order, result) in orders.into_iter().zip(results) {
            let outcome = if result.is_ok() { "ok" } else { "failed" };
            self.metrics.load_orders.get_or_create(&OutcomeLabels { outcome }).inc();
            match result {
                Ok(()) => {
                    if let Some(worker) = state.workers.get_mut(&order.worker) {
                        let new = order.experts.iter().filter(|expert| !worker.resident.contains(expert)).count();
                        self.metrics.experts_loaded.inc_by(new as u64);
                        worker.resident.extend(order.experts.iter().copied());
                        worker.load_failures = 0;
                        worker.retry_load_after = None;
                    }
                }
                Err(error) => {
                    let mut retry_in = Duration::ZERO;
                    if let Some(worker) = state.workers.get_mut(&order.worker) {
                        worker.load_failures += 1;
                        let doublings = worker.load_failures.min(10) - 1;
                        retry_in = (self.config.heartbeat_interval * 2u32.pow(doublings)).min(MAX_LOAD_RETRY_DELAY);
                        worker.retry_load_after = Some(Instant::now() + retry_in);
                    }
                    tracing::error!(worker_id = %order.worker, endpoint = %order.endpoint, %error, ?retry_in, "worker failed to load its experts");
                }
            }
        }
        // The invariant, enforced here once: the table routes an expert only to a live worker that
        // holds it (a load failed, was not tried while backing off, or the worker left meanwhile).
        plan.retain(|expert, owner| state.workers.get(owner).is_some_and(|worker| worker.resident.contains(expert)));
        if !state.placed_once || plan != state.placement {
            state.placement = plan;
            state.placed_once = true;
            self.publish(&state);
        }
        self.due_unloads(&mut state)
    }

    fn publish(&self, state: &State) {
        let routes = self
            .config
            .model
            .expert_keys()
            .map(|key| v1::ExpertRoute {
                expert: Some(key.into()),
                endpoints: state
                    .placement
                    .get(&key)
                    .and_then(|owner| state.workers.get(owner))
                    .map(|worker| vec![worker.endpoint.clone()])
                    .unwrap_or_default(),
            })
            .collect();
        let version = self.table.borrow().version + 1;
        let table = v1::RoutingTable {
            version,
            model: Some(self.config.model.to_proto()),
            routes,
            queue_limit_tokens: self.config.queue_limit_tokens,
            max_batch_tokens: self.config.max_batch_tokens,
        };
        tracing::info!(
            version,
            placed = state.placement.len(),
            workers = state.workers.len(),
            "routing table published"
        );
        self.metrics.table_version.set(version as i64);
        self.metrics.placed_experts.set(state.placement.len() as i64);
        // Only live workers keep a series, so the label set stays bounded by the cluster size.
        self.metrics.worker_placed_experts.clear();
        for worker in state.workers.values() {
            let placed = state.placement.values().filter(|owner| **owner == worker.id).count();
            self.metrics
                .worker_placed_experts
                .get_or_create(&WorkerLabels { worker: worker.id.to_string() })
                .set(placed as i64);
        }
        self.table.send_replace(Arc::new(table));
    }

    fn due_unloads(&self, state: &mut State) -> Vec<(String, Vec<ExpertId>)> {
        let now = Instant::now();
        let placement = state.placement.clone();
        let mut still_retired = BTreeMap::new();
        let mut due: Vec<(String, Vec<ExpertId>)> = Vec::new();
        for worker in state.workers.values_mut() {
            let surplus: Vec<ExpertId> =
                worker.resident.iter().filter(|expert| placement.get(expert) != Some(&worker.id)).copied().collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// (endpoint, experts) of one recorded call.
    type Call = (String, Vec<ExpertId>);

    /// Records every call; fails loads to the endpoints in `failing`.
    #[derive(Debug, Default)]
    struct FakeControl {
        loads: Mutex<Vec<Call>>,
        unloads: Mutex<Vec<Call>>,
        failing: Mutex<BTreeSet<String>>,
    }

    impl WorkerControl for Arc<FakeControl> {
        async fn load(&self, endpoint: &str, load: ExpertLoad<'_>) -> Result<(), ControlError> {
            self.loads.lock().expect("lock").push((endpoint.to_owned(), load.experts));
            if self.failing.lock().expect("lock").contains(endpoint) {
                Err(ControlError::Refused {
                    endpoint: endpoint.to_owned(),
                    code: tonic::Code::FailedPrecondition,
                    message: "out of memory".into(),
                })
            } else {
                Ok(())
            }
        }

        async fn unload(&self, endpoint: &str, experts: Vec<ExpertId>) -> Result<(), ControlError> {
            self.unloads.lock().expect("lock").push((endpoint.to_owned(), experts));
            Ok(())
        }
    }

    fn config(min_workers: usize) -> ClusterConfig {
        ClusterConfig {
            model: ModelSpec { d_model: 8, d_ff: 16, ..ModelSpec::default_synthetic() },
            heartbeat_interval: Duration::from_millis(10),
            heartbeat_timeout: Duration::from_millis(200),
            min_workers,
            queue_limit_tokens: 64,
            max_batch_tokens: 256,
            unload_grace: Duration::ZERO,
        }
    }

    fn registration(endpoint: &str) -> Registration {
        Registration {
            protocol_version: PROTOCOL_VERSION,
            name: endpoint.into(),
            endpoint: endpoint.into(),
            device: "cpu".into(),
            memory_bytes: 1 << 30,
            dtype: None,
            loaded_experts: Vec::new(),
        }
    }

    fn endpoints_by_expert(table: &v1::RoutingTable) -> Vec<String> {
        table.routes.iter().map(|route| route.endpoints.join(",")).collect()
    }

    #[tokio::test]
    async fn waits_for_min_workers_then_places_and_publishes_version_1() {
        let control = Arc::new(FakeControl::default());
        let cluster = Cluster::new(config(2), control.clone(), CoordinatorMetrics::default());
        cluster.register(registration("a")).expect("register");
        cluster.reconcile_once().await;
        assert_eq!(cluster.table().version, 0, "one of two workers: nothing placed yet");
        cluster.register(registration("b")).expect("register");
        cluster.reconcile_once().await;
        let table = cluster.table();
        assert_eq!(table.version, 1);
        assert_eq!(table.queue_limit_tokens, 64);
        let owners = endpoints_by_expert(&table);
        assert_eq!(owners.iter().filter(|owner| *owner == "a").count(), 4);
        assert_eq!(owners.iter().filter(|owner| *owner == "b").count(), 4);
        assert_eq!(control.loads.lock().expect("lock").len(), 2, "one LoadExperts per worker");
        cluster.reconcile_once().await;
        assert_eq!(cluster.table().version, 1, "nothing changed, nothing published");
    }

    /// Memory holds twice as many bf16 experts as f32 ones: a GPU worker (synthetic weights default
    /// to bf16 there) or one given `--dtype bf16` takes all eight experts in memory for four f32 ones.
    #[tokio::test]
    async fn placement_counts_memory_in_the_dtype_each_worker_keeps_experts_in() {
        let f32_expert = config(1).model.expert_bytes_of(0, WeightDtype::F32);
        let room_for_four_f32_experts = |endpoint: &str, device: &str, dtype| Registration {
            device: device.into(),
            memory_bytes: 4 * f32_expert,
            dtype,
            ..registration(endpoint)
        };
        let placed_on_one_worker = |registration: Registration| async move {
            let cluster = Cluster::new(config(1), Arc::new(FakeControl::default()), CoordinatorMetrics::default());
            cluster.register(registration).expect("register");
            cluster.reconcile_once().await;
            let status = cluster.status();
            (status.workers[0].experts.len(), status.workers[0].assigned_bytes)
        };
        assert_eq!(placed_on_one_worker(room_for_four_f32_experts("cpu", "cpu", None)).await, (4, 4 * f32_expert));
        assert_eq!(placed_on_one_worker(room_for_four_f32_experts("gpu", "cuda:0", None)).await, (8, 4 * f32_expert));
        let told_bf16 = room_for_four_f32_experts("cpu-bf16", "cpu", Some(WeightDtype::Bf16));
        assert_eq!(placed_on_one_worker(told_bf16).await.0, 8);
        let told_f32 = room_for_four_f32_experts("gpu-f32", "cuda:0", Some(WeightDtype::F32));
        assert_eq!(placed_on_one_worker(told_f32).await.0, 4);
    }

    #[tokio::test]
    async fn a_silent_worker_is_removed_and_its_experts_move_to_the_survivor() {
        let control = Arc::new(FakeControl::default());
        let cluster = Cluster::new(config(2), control.clone(), CoordinatorMetrics::default());
        let (a, _) = cluster.register(registration("a")).expect("register");
        cluster.register(registration("b")).expect("register");
        cluster.reconcile_once().await;
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            cluster.heartbeat(PROTOCOL_VERSION, &a.0, 0, 0).expect("a is alive");
        }
        cluster.reconcile_once().await;
        let table = cluster.table();
        assert_eq!(table.version, 2);
        assert!(endpoints_by_expert(&table).iter().all(|owner| owner == "a"));
        let loads = control.loads.lock().expect("lock");
        assert_eq!(loads.last().map(|(endpoint, experts)| (endpoint.as_str(), experts.len())), Some(("a", 8)));
        let status = cluster.status();
        assert_eq!(status.workers.len(), 1);
        assert!(status.unplaced_experts.is_empty());
    }

    /// The metrics as Prometheus text.
    fn scrape(metrics: &CoordinatorMetrics) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry()).expect("encode");
        text
    }

    #[tokio::test]
    async fn experts_moved_to_a_joiner_are_published_before_the_old_owner_unloads_them() {
        let control = Arc::new(FakeControl::default());
        let metrics = CoordinatorMetrics::default();
        let cluster = Cluster::new(config(1), control.clone(), metrics.clone());
        cluster.register(registration("a")).expect("register");
        cluster.reconcile_once().await;
        assert!(endpoints_by_expert(&cluster.table()).iter().all(|owner| owner == "a"));
        cluster.register(registration("b")).expect("register");
        cluster.reconcile_once().await;
        let owners = endpoints_by_expert(&cluster.table());
        assert_eq!(owners.iter().filter(|owner| *owner == "b").count(), 4);
        let unloads = control.unloads.lock().expect("lock");
        assert_eq!(unloads.len(), 1);
        assert_eq!(unloads[0].0, "a");
        assert_eq!(unloads[0].1, (4..8).map(|e| ExpertId::new(0, e)).collect::<Vec<_>>());
        let text = scrape(&metrics);
        for line in [
            "switchyard_coordinator_experts_loaded_total 12",
            "switchyard_coordinator_experts_unloaded_total 4",
            "switchyard_coordinator_load_orders_total{outcome=\"ok\"} 2",
            "switchyard_coordinator_placed_experts 8",
            "switchyard_coordinator_table_version 2",
        ] {
            assert!(text.lines().any(|metric| metric == line), "{line} in\n{text}");
        }
        let per_worker: Vec<&str> =
            text.lines().filter(|line| line.starts_with("switchyard_coordinator_worker_placed_experts{")).collect();
        assert_eq!(per_worker.len(), 2, "{per_worker:?}");
        assert!(per_worker.iter().all(|line| line.ends_with(" 4")), "{per_worker:?}");
    }

    #[tokio::test]
    async fn a_failed_load_is_not_published_and_is_retried() {
        let control = Arc::new(FakeControl::default());
        control.failing.lock().expect("lock").insert("b".into());
        let metrics = CoordinatorMetrics::default();
        let cluster = Cluster::new(config(2), control.clone(), metrics.clone());
        cluster.register(registration("a")).expect("register");
        cluster.register(registration("b")).expect("register");
        cluster.reconcile_once().await;
        let owners = endpoints_by_expert(&cluster.table());
        assert!(owners.iter().all(|owner| owner == "a" || owner.is_empty()));
        assert!(owners.iter().any(String::is_empty), "b's share waits unpublished");
        assert!(scrape(&metrics).contains("switchyard_coordinator_load_orders_total{outcome=\"failed\"} 1\n"));
        control.failing.lock().expect("lock").clear();
        cluster.reconcile_once().await;
        assert_eq!(control.loads.lock().expect("lock").len(), 2, "b is backing off: not asked again at once");
        tokio::time::sleep(Duration::from_millis(15)).await;
        cluster.reconcile_once().await;
        assert!(endpoints_by_expert(&cluster.table()).iter().all(|owner| !owner.is_empty()));
    }

    #[test]
    fn registration_and_heartbeat_errors_name_the_field() {
        let cluster = Cluster::new(config(1), Arc::new(FakeControl::default()), CoordinatorMetrics::default());
        let stale = Registration { protocol_version: 99, ..registration("a") };
        assert!(cluster.register(stale).unwrap_err().to_string().starts_with("protocol_version"));
        let empty = Registration { memory_bytes: 0, ..registration("a") };
        assert!(cluster.register(empty).unwrap_err().to_string().starts_with("memory_bytes"));
        let error = cluster.heartbeat(PROTOCOL_VERSION, "w404", 0, 0).unwrap_err();
        assert_eq!(error, CoordinatorError::UnknownWorker("w404".into()));
        assert_eq!(tonic::Status::from(error).code(), tonic::Code::NotFound);
    }
}
