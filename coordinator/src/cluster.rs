//! [`Cluster`]: the coordinator's logic as a plain struct, tested without a network.
//!
//! Membership (register, heartbeat, drain, expiry) updates the state under a short lock and runs
//! on its own timer, so a worker's death is published even while another worker's load is stuck.
//! Placement changes come from reconcile rounds: a round plans ([`crate::placement::plan`]) and
//! orders the loads; each load runs as its own task and, when it completes, the table is
//! republished. The table only names experts a worker holds: an expert on its way to a new holder
//! stays routed to its old one (make-before-break), which unloads it once a grace period has passed
//! so clients still on the previous table are not cut off.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use switchyard_model::{ExpertId, ModelSpec, WeightDtype};
use switchyard_proto::PROTOCOL_VERSION;
use switchyard_proto::v1;
use tokio::sync::{Notify, watch};

use crate::balance::{Balance, Balancer, Eplb, Traffic};
use crate::control::{ControlError, ExpertLoad, WorkerControl};
use crate::error::CoordinatorError;
use crate::metrics::{CoordinatorMetrics, OutcomeLabels, WorkerLabels};
use crate::placement::{self, Goal, Placement, WorkerId, WorkerSlot, holders};

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub model: ModelSpec,
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is removed and its experts placed on the survivors. A worker
    /// that misses one heartbeat is probed: one that refuses connections is removed at once.
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
    /// Workers holding each expert (at most one copy per worker): with 2, a worker's death costs no
    /// call, as clients retry on the other holder.
    pub replicas: usize,
    /// Replicas of particular experts (by their index in every MoE layer), instead of `replicas`.
    pub expert_replicas: BTreeMap<u32, usize>,
    /// Load-aware placement from measured traffic; `None`: experts are balanced by size alone.
    pub balancing: Option<Balancing>,
}

impl ClusterConfig {
    /// Workers wanted for `expert`: its override, else `replicas`.
    pub fn replicas_of(&self, expert: ExpertId) -> usize {
        self.expert_replicas.get(&expert.expert).copied().unwrap_or(self.replicas)
    }
}

/// How often placement follows the measured traffic, and how many redundant replicas it may add.
#[derive(Debug, Clone, Copy)]
pub struct Balancing {
    pub interval: Duration,
    /// Extra replicas beyond `replicas` per expert, each given to the hottest expert (EPLB).
    pub redundant: usize,
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
    /// Matrix-multiply rate in GFLOP/s; 0: unknown.
    pub compute_gflops: f64,
    /// The certificate (DER) it registered over, under mutual TLS: its heartbeats and drain must
    /// come over the same one.
    pub identity: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct WorkerRecord {
    pub id: WorkerId,
    pub name: String,
    pub endpoint: String,
    pub device: String,
    pub memory_bytes: u64,
    /// Its matrix-multiply rate (GFLOP/s; 0: unknown): placement's weight for it.
    pub compute_gflops: f64,
    /// The certificate it registered over, if the coordinator runs TLS.
    pub identity: Option<Vec<u8>>,
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
    /// A LoadExperts call to it is in flight: no second one is ordered meanwhile.
    pub loading: bool,
    /// A liveness probe to it is in flight.
    pub probing: bool,
    /// It is stopping: nothing is placed on it, and its experts move before it goes.
    pub draining: bool,
}

/// What a heartbeat tells the worker back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatReply {
    pub table_version: u64,
    /// Whether the experts were placed yet.
    pub placed: bool,
    /// Experts placed on the worker that it does not hold yet.
    pub experts_to_load: usize,
}

#[derive(Debug, Default)]
struct State {
    workers: BTreeMap<WorkerId, WorkerRecord>,
    /// The last plan: where experts should be.
    target: Placement,
    /// What the published table routes: the target's holders that hold the expert already, else
    /// any live worker still holding it.
    published: Placement,
    registrations: u64,
    placed_once: bool,
    /// (worker, expert) pairs the table no longer routes to that worker, and since when.
    retired: BTreeMap<(WorkerId, ExpertId), Instant>,
    /// Unplaced experts at the last round, so the warning is logged on change, not every round.
    unplaced: usize,
    /// The last load balance computed from traffic (EPLB), if balancing is on and traffic was seen.
    balance: Option<Balance>,
}

// Lock order: `state`, then `traffic`; never the other way round.

/// The longest wait before a worker whose loads keep failing is asked again.
const MAX_LOAD_RETRY_DELAY: Duration = Duration::from_secs(60);
/// A registered compute rate above this (10 PFLOP/s) is a mistake or a lie.
const MAX_COMPUTE_GFLOPS: f64 = 1e7;

/// One load to issue.
#[derive(Debug)]
struct LoadOrder {
    worker: WorkerId,
    endpoint: String,
    experts: BTreeSet<ExpertId>,
}

#[derive(Debug)]
pub struct Cluster<C> {
    config: ClusterConfig,
    /// This coordinator instance's epoch (its start, unix milliseconds), carried by every table.
    epoch: u64,
    started: Instant,
    state: Mutex<State>,
    table: watch::Sender<Arc<v1::RoutingTable>>,
    wake: Notify,
    control: C,
    metrics: CoordinatorMetrics,
    traffic: Mutex<Traffic>,
    balancer: Box<dyn Balancer>,
}

impl<C: WorkerControl> Cluster<C> {
    pub fn new(config: ClusterConfig, control: C, metrics: CoordinatorMetrics) -> Arc<Self> {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |since| since.as_millis() as u64);
        let empty = v1::RoutingTable {
            version: 0,
            epoch,
            model: Some(config.model.to_proto()),
            routes: Vec::new(),
            queue_limit_tokens: config.queue_limit_tokens,
            max_batch_tokens: config.max_batch_tokens,
        };
        let (table, _) = watch::channel(Arc::new(empty));
        let (window, redundant) = config
            .balancing
            .map_or((Duration::from_secs(60), 0), |balancing| (balancing.interval * 2, balancing.redundant));
        Arc::new(Self {
            traffic: Mutex::new(Traffic::new(window)),
            balancer: Box::new(Eplb { redundant }),
            config,
            epoch,
            started: Instant::now(),
            state: Mutex::new(State::default()),
            table,
            wake: Notify::new(),
            control,
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn traffic(&self) -> MutexGuard<'_, Traffic> {
        self.traffic.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
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
        for (field, text) in
            [("name", &registration.name), ("endpoint", &registration.endpoint), ("device", &registration.device)]
        {
            check_label(field, text)?;
        }
        if registration.memory_bytes == 0 {
            return Err(CoordinatorError::InvalidArgument { field: "memory_bytes", reason: "must be positive".into() });
        }
        if !(registration.compute_gflops.is_finite()
            && (0.0..=MAX_COMPUTE_GFLOPS).contains(&registration.compute_gflops))
        {
            return Err(CoordinatorError::InvalidArgument {
                field: "compute_gflops",
                reason: format!(
                    "{} is not a rate between 0 (unknown) and {MAX_COMPUTE_GFLOPS:e}",
                    registration.compute_gflops
                ),
            });
        }
        let mut state = self.lock();
        state.workers.retain(|id, worker| {
            let replaced = worker.endpoint == registration.endpoint;
            if replaced {
                self.traffic().forget(id);
            }
            !replaced
        });
        state.registrations += 1;
        // Unique across coordinator restarts: a worker heartbeating with the id an earlier
        // coordinator gave it must be told to register again, not be taken for another worker.
        let id = WorkerId(format!("w{}-{:x}", state.registrations, self.epoch));
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
                compute_gflops: registration.compute_gflops,
                identity: registration.identity,
                resident,
                last_heartbeat: Instant::now(),
                queued_tokens: 0,
                tokens_served: 0,
                load_failures: 0,
                retry_load_after: None,
                loading: false,
                probing: false,
                draining: false,
            },
        );
        self.metrics.live_workers.set(state.workers.len() as i64);
        // A restarted worker replaced its old record: routes to the old record go.
        self.republish(&mut state);
        drop(state);
        self.wake.notify_one();
        Ok((id, self.config.heartbeat_interval))
    }

    /// Whether `caller` (a certificate, under mutual TLS) may speak for `worker_id`: the one that
    /// registered it. An unknown id is left to the call itself to refuse.
    pub fn check_owner(&self, worker_id: &str, caller: Option<&[u8]>) -> Result<(), CoordinatorError> {
        let state = self.lock();
        match state.workers.get(&WorkerId(worker_id.to_owned())) {
            Some(worker) if worker.identity.is_some() && worker.identity.as_deref() != caller => {
                Err(CoordinatorError::NotOwner(worker_id.to_owned()))
            }
            _ => Ok(()),
        }
    }

    /// A worker is alive; `offered` is each of its experts' cumulative count of tokens offered.
    pub fn heartbeat(
        &self,
        protocol_version: u32,
        worker_id: &str,
        queued_tokens: u64,
        tokens_served: u64,
        offered: &[(ExpertId, u64)],
    ) -> Result<HeartbeatReply, CoordinatorError> {
        check_protocol(protocol_version)?;
        let id = WorkerId(worker_id.to_owned());
        let mut state = self.lock();
        let State { workers, target, placed_once, .. } = &mut *state;
        let worker = workers.get_mut(&id).ok_or_else(|| CoordinatorError::UnknownWorker(worker_id.to_owned()))?;
        worker.last_heartbeat = Instant::now();
        worker.queued_tokens = queued_tokens;
        worker.tokens_served = tokens_served;
        let experts_to_load =
            target.iter().filter(|(expert, owners)| owners.contains(&id) && !worker.resident.contains(expert)).count();
        let placed = *placed_once;
        drop(state);
        self.traffic().record(&id, offered);
        Ok(HeartbeatReply { table_version: self.table.borrow().version, placed, experts_to_load })
    }

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

    /// A worker that is stopping: place nothing more on it and move its experts away first.
    /// Returns how many experts the published table still routes to it, and the table's version.
    pub fn drain(&self, protocol_version: u32, worker_id: &str) -> Result<(u32, u64), CoordinatorError> {
        check_protocol(protocol_version)?;
        let mut state = self.lock();
        let id = WorkerId(worker_id.to_owned());
        let worker = state.workers.get_mut(&id).ok_or_else(|| CoordinatorError::UnknownWorker(worker_id.to_owned()))?;
        worker.last_heartbeat = Instant::now();
        if !worker.draining {
            worker.draining = true;
            tracing::info!(worker_id = %id, endpoint = %worker.endpoint, "worker is draining; moving its experts");
            self.wake.notify_one();
        }
        let routed = state.published.values().filter(|owners| owners.contains(&id)).count() as u32;
        Ok((routed, self.table.borrow().version))
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
                    .published
                    .iter()
                    .filter(|(_, owners)| owners.contains(&worker.id))
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
                    draining: worker.draining,
                    compute_gflops: worker.compute_gflops,
                }
            })
            .collect();
        let unplaced_experts = self
            .config
            .model
            .expert_keys()
            .filter(|key| holders(&state.published, key).is_empty())
            .map(Into::into)
            .collect();
        v1::ClusterStatus {
            table_version: self.table.borrow().version,
            model: Some(self.config.model.to_proto()),
            workers,
            unplaced_experts,
        }
    }

    /// Reconciles until `shutdown` resolves: on every registration, drain and finished load, and
    /// every heartbeat interval; membership is watched meanwhile on its own timer.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let membership = tokio::spawn(self.clone().watch_membership());
        let mut balanced = Instant::now();
        loop {
            if let Some(balancing) = self.config.balancing
                && balanced.elapsed() >= balancing.interval
            {
                self.rebalance_by_traffic();
                balanced = Instant::now();
            }
            for order in self.plan_round() {
                tokio::spawn(self.clone().load_owned(order));
            }
            let unloads = self.due_unloads();
            if !unloads.is_empty() {
                tokio::spawn(self.clone().unload_owned(unloads));
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.config.heartbeat_interval) => {}
            }
        }
        membership.abort();
    }

    /// One round, waiting for its loads and unloads (what `run` does in tasks): for tests and tools.
    pub async fn reconcile_once(&self) {
        let orders = self.plan_round();
        futures::future::join_all(orders.into_iter().map(|order| self.load(order))).await;
        self.unload(self.due_unloads()).await;
    }

    /// Expires silent workers and probes late ones, every half heartbeat interval, forever.
    async fn watch_membership(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.config.heartbeat_interval / 2);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.check_membership();
            for (id, endpoint) in self.late_workers() {
                let cluster = self.clone();
                tokio::spawn(async move { cluster.probe(id, endpoint).await });
            }
        }
    }

    /// Removes workers silent past the timeout and republishes without them.
    pub fn check_membership(&self) {
        let mut state = self.lock();
        if self.expire_silent(&mut state) {
            self.republish(&mut state);
            drop(state);
            self.wake.notify_one();
        }
    }

    /// Workers that missed a heartbeat and are not being probed yet (each marked as probed).
    fn late_workers(&self) -> Vec<(WorkerId, String)> {
        let late_after = self.config.heartbeat_interval.mul_f64(1.5);
        let now = Instant::now();
        let mut state = self.lock();
        state
            .workers
            .values_mut()
            .filter(|worker| !worker.probing && now.duration_since(worker.last_heartbeat) > late_after)
            .map(|worker| {
                worker.probing = true;
                (worker.id.clone(), worker.endpoint.clone())
            })
            .collect()
    }

    /// Asks a late worker whether it is there: one that refuses connections (a killed process) is
    /// removed at once; one that does not answer in time (a stopped one) waits for the timeout.
    pub async fn probe(&self, id: WorkerId, endpoint: String) {
        let outcome = self.control.probe(&endpoint).await;
        let mut state = self.lock();
        if let Some(worker) = state.workers.get_mut(&id) {
            worker.probing = false;
        }
        if let Err(ControlError::Unreachable { message, .. }) = outcome
            && state.workers.remove(&id).is_some()
        {
            tracing::warn!(worker_id = %id, %endpoint, error = %message, "late worker is unreachable; removing it");
            self.metrics.worker_expirations.inc();
            self.traffic().forget(&id);
            self.metrics.live_workers.set(state.workers.len() as i64);
            self.republish(&mut state);
            drop(state);
            self.wake.notify_one();
        }
    }

    fn expire_silent(&self, state: &mut State) -> bool {
        let now = Instant::now();
        let timeout = self.config.heartbeat_timeout;
        let before = state.workers.len();
        state.workers.retain(|id, worker| {
            let alive = now.duration_since(worker.last_heartbeat) <= timeout;
            if !alive {
                tracing::warn!(worker_id = %id, endpoint = %worker.endpoint, "worker missed heartbeats; removing it");
                self.metrics.worker_expirations.inc();
                self.traffic().forget(id);
            }
            alive
        });
        self.metrics.live_workers.set(state.workers.len() as i64);
        state.workers.len() != before
    }

    /// Plans where experts go and returns the loads to order (each worker marked as loading).
    fn plan_round(&self) -> Vec<LoadOrder> {
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
                // each token costs (shared experts may be larger).
                let load_of = |expert: ExpertId| {
                    let rate = balance.per_replica_rate.get(&expert).copied().unwrap_or(0.0);
                    (rate * parameters_of(expert) as f64) as u64
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

    async fn load_owned(self: Arc<Self>, order: LoadOrder) {
        self.load(order).await;
    }

    async fn unload_owned(self: Arc<Self>, unloads: Vec<(String, Vec<ExpertId>)>) {
        self.unload(unloads).await;
    }

    async fn load(&self, order: LoadOrder) {
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
    fn finish_load(&self, order: LoadOrder, result: Result<(), ControlError>) {
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

    async fn unload(&self, unloads: Vec<(String, Vec<ExpertId>)>) {
        let unloads = unloads.into_iter().map(|(endpoint, experts)| async move {
            if let Err(error) = self.control.unload(&endpoint, experts).await {
                tracing::warn!(%endpoint, %error, "unloading retired experts failed");
            }
        });
        futures::future::join_all(unloads).await;
    }

    /// Recomputes what the table routes and publishes a new version when it changed. The invariant,
    /// enforced here once: the table routes an expert only to live workers that hold it.
    fn republish(&self, state: &mut State) {
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

    /// Experts workers hold that neither the plan nor the table gives them any more, once their
    /// grace has passed: (endpoint, experts) to unload.
    fn due_unloads(&self) -> Vec<(String, Vec<ExpertId>)> {
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

fn check_protocol(protocol_version: u32) -> Result<(), CoordinatorError> {
    if protocol_version != PROTOCOL_VERSION {
        return Err(CoordinatorError::ProtocolMismatch { worker: protocol_version, coordinator: PROTOCOL_VERSION });
    }
    Ok(())
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

/// Longest name, endpoint or device a worker may register with.
const MAX_LABEL_CHARS: usize = 256;

/// A worker's self-description goes into logs, status and metrics labels: a newline or an escape
/// sequence in it could forge log lines or repaint a terminal.
fn check_label(field: &'static str, text: &str) -> Result<(), CoordinatorError> {
    let invalid = |reason: String| Err(CoordinatorError::InvalidArgument { field, reason });
    if text.chars().count() > MAX_LABEL_CHARS {
        return invalid(format!("longer than {MAX_LABEL_CHARS} characters"));
    }
    if let Some(control) = text.chars().find(|c| c.is_control()) {
        return invalid(format!("contains the control character {:?}", control));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (endpoint, experts) of one recorded call.
    type Call = (String, Vec<ExpertId>);

    /// Records every call; fails loads to the endpoints in `failing`, never finishes those to
    /// `hanging`, and finds nothing listening at those in `gone`.
    #[derive(Debug, Default)]
    struct FakeControl {
        loads: Mutex<Vec<Call>>,
        unloads: Mutex<Vec<Call>>,
        failing: Mutex<BTreeSet<String>>,
        hanging: Mutex<BTreeSet<String>>,
        gone: Mutex<BTreeSet<String>>,
    }

    impl WorkerControl for Arc<FakeControl> {
        async fn load(&self, endpoint: &str, load: ExpertLoad<'_>) -> Result<(), ControlError> {
            self.loads.lock().expect("lock").push((endpoint.to_owned(), load.experts));
            if self.hanging.lock().expect("lock").contains(endpoint) {
                std::future::pending::<()>().await;
            }
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

        async fn probe(&self, endpoint: &str) -> Result<(), ControlError> {
            if self.gone.lock().expect("lock").contains(endpoint) {
                Err(ControlError::Unreachable { endpoint: endpoint.to_owned(), message: "connection refused".into() })
            } else {
                Ok(())
            }
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
            replicas: 1,
            expert_replicas: BTreeMap::new(),
            balancing: None,
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
            compute_gflops: 0.0,
            identity: None,
        }
    }

    fn endpoints_by_expert(table: &v1::RoutingTable) -> Vec<String> {
        table.routes.iter().map(|route| route.endpoints.join(",")).collect()
    }

    #[tokio::test]
    async fn waits_for_min_workers_then_places_and_publishes_each_load_as_it_lands() {
        let control = Arc::new(FakeControl::default());
        let cluster = Cluster::new(config(2), control.clone(), CoordinatorMetrics::default());
        cluster.register(registration("a")).expect("register");
        cluster.reconcile_once().await;
        assert_eq!(cluster.table().version, 0, "one of two workers: nothing placed yet");
        cluster.register(registration("b")).expect("register");
        cluster.reconcile_once().await;
        let table = cluster.table();
        assert_eq!(table.version, 2, "a version as each worker's load lands");
        assert_eq!(table.epoch, cluster.epoch());
        assert_eq!(table.queue_limit_tokens, 64);
        let owners = endpoints_by_expert(&table);
        assert_eq!(owners.iter().filter(|owner| *owner == "a").count(), 4);
        assert_eq!(owners.iter().filter(|owner| *owner == "b").count(), 4);
        assert_eq!(control.loads.lock().expect("lock").len(), 2, "one LoadExperts per worker");
        cluster.reconcile_once().await;
        assert_eq!(cluster.table().version, 2, "nothing changed, nothing published");
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
    async fn heartbeats_tell_a_worker_whether_its_experts_are_placed_and_loaded() {
        let cluster = Cluster::new(config(2), Arc::new(FakeControl::default()), CoordinatorMetrics::default());
        let (a, _) = cluster.register(registration("a")).expect("register");
        let beat = |id: &WorkerId| cluster.heartbeat(PROTOCOL_VERSION, &id.0, 0, 0, &[]).expect("alive");
        assert!(cluster.plan_round().is_empty());
        assert_eq!(
            beat(&a),
            HeartbeatReply { table_version: beat(&a).table_version, placed: false, experts_to_load: 0 }
        );

        let (b, _) = cluster.register(registration("b")).expect("register");
        let orders = cluster.plan_round();
        assert_eq!(orders.len(), 2, "both workers get experts to load");
        let placed_on_a = orders.iter().find(|order| order.worker == a).expect("a's order").experts.len();
        assert!(placed_on_a > 0);
        assert_eq!((beat(&a).placed, beat(&a).experts_to_load), (true, placed_on_a), "placed, not loaded yet");

        for order in orders {
            cluster.finish_load(order, Ok(()));
        }
        for worker in [&a, &b] {
            assert_eq!((beat(worker).placed, beat(worker).experts_to_load), (true, 0), "its experts are loaded");
        }
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
            cluster.heartbeat(PROTOCOL_VERSION, &a.0, 0, 0, &[]).expect("a is alive");
        }
        cluster.reconcile_once().await;
        let table = cluster.table();
        assert_eq!(table.version, 4, "b's routes dropped (3), then its experts loaded on a (4)");
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
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry(&Default::default())).expect("encode");
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

    #[tokio::test]
    async fn worker_ids_of_an_earlier_coordinator_are_unknown_to_a_restarted_one() {
        let first = Cluster::new(config(1), Arc::new(FakeControl::default()), CoordinatorMetrics::default());
        let (old_id, _) = first.register(registration("a")).expect("register");
        tokio::time::sleep(Duration::from_millis(2)).await;
        let restarted = Cluster::new(config(1), Arc::new(FakeControl::default()), CoordinatorMetrics::default());
        let (new_id, _) = restarted.register(registration("b")).expect("register");
        assert_ne!(old_id, new_id, "both are the first registration of their coordinator");
        assert_eq!(
            restarted.heartbeat(PROTOCOL_VERSION, &old_id.0, 0, 0, &[]),
            Err(CoordinatorError::UnknownWorker(old_id.0))
        );
    }

    #[test]
    fn registration_and_heartbeat_errors_name_the_field() {
        let cluster = Cluster::new(config(1), Arc::new(FakeControl::default()), CoordinatorMetrics::default());
        let stale = Registration { protocol_version: 99, ..registration("a") };
        assert!(cluster.register(stale).unwrap_err().to_string().starts_with("protocol_version"));
        let empty = Registration { memory_bytes: 0, ..registration("a") };
        assert!(cluster.register(empty).unwrap_err().to_string().starts_with("memory_bytes"));
        let forged = Registration { name: "w1\n2026-12-01 INFO worker removed".into(), ..registration("a") };
        assert!(cluster.register(forged).unwrap_err().to_string().starts_with("name: contains the control character"));
        let painted = Registration { device: "\u{1b}[31mcuda".into(), ..registration("a") };
        assert!(cluster.register(painted).unwrap_err().to_string().starts_with("device: contains the control"));
        let long = Registration { endpoint: format!("http://{}", "a".repeat(300)), ..registration("a") };
        assert!(cluster.register(long).unwrap_err().to_string().starts_with("endpoint: longer than 256"));
        for compute_gflops in [f64::NAN, f64::INFINITY, -1.0, 1e300] {
            let inflated = Registration { compute_gflops, ..registration("a") };
            let error = cluster.register(inflated).unwrap_err().to_string();
            assert!(error.starts_with("compute_gflops: "), "{error}");
        }
        assert!(cluster.status().workers.is_empty(), "none of them registered");
        // Under mutual TLS a worker id is bound to the certificate that registered it.
        let (id, _) =
            cluster.register(Registration { identity: Some(vec![1]), ..registration("a") }).expect("register");
        assert_eq!(cluster.check_owner(&id.0, Some(&[1])), Ok(()));
        let stolen = cluster.check_owner(&id.0, Some(&[2])).unwrap_err();
        assert_eq!(stolen.to_string(), format!("worker_id: worker '{id}' was registered over another certificate"));
        assert_eq!(tonic::Status::from(stolen).code(), tonic::Code::PermissionDenied);
        assert!(cluster.check_owner(&id.0, None).is_err(), "nor without a certificate");
        let error = cluster.heartbeat(PROTOCOL_VERSION, "w404", 0, 0, &[]).unwrap_err();
        assert_eq!(error, CoordinatorError::UnknownWorker("w404".into()));
        assert_eq!(tonic::Status::from(error).code(), tonic::Code::NotFound);
    }

    /// Fuzz target: any registration and heartbeat a network peer can send is taken or refused
    /// with a named field, never a panic, and only well-formed workers are listed.
    mod hostile_membership {
        use proptest::prelude::*;

        use super::*;

        fn expert_loads() -> impl Strategy<Value = Vec<(u32, u32, u64)>> {
            prop::collection::vec((0u32..2048, 0u32..5000, any::<u64>()), 0..12)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn any_registration_and_heartbeat_is_taken_or_refused(
                name in ".{0,300}",
                endpoint in ".{0,300}",
                device in ".{0,40}",
                memory_bytes in any::<u64>(),
                compute_gflops in prop_oneof![Just(0.0), 0.0..1e6, any::<f64>()],
                protocol in prop_oneof![Just(PROTOCOL_VERSION), any::<u32>()],
                loaded in expert_loads(),
                heartbeat_id in prop_oneof![Just(None), ".{0,24}".prop_map(Some)],
                queued in any::<u64>(),
            ) {
                let cluster = Cluster::new(config(1), Arc::new(FakeControl::default()), CoordinatorMetrics::default());
                let registration = Registration {
                    protocol_version: protocol,
                    name,
                    endpoint,
                    device,
                    memory_bytes,
                    dtype: None,
                    loaded_experts: loaded.iter().map(|(layer, expert, _)| ExpertId::new(*layer, *expert)).collect(),
                    compute_gflops,
                    identity: None,
                };
                let registered = cluster.register(registration).ok().map(|(id, _)| id);
                let offered: Vec<(ExpertId, u64)> =
                    loaded.iter().map(|(layer, expert, tokens)| (ExpertId::new(*layer, *expert), *tokens)).collect();
                let id = heartbeat_id.or_else(|| registered.as_ref().map(|id| id.0.clone())).unwrap_or_default();
                let beat = cluster.heartbeat(protocol, &id, queued, queued, &offered);
                prop_assert!(beat.is_ok() == (registered.as_ref().is_some_and(|known| known.0 == id) && protocol == PROTOCOL_VERSION));
                for worker in cluster.status().workers {
                    prop_assert!(!worker.name.chars().any(char::is_control) && !worker.endpoint.is_empty());
                }
            }
        }
    }

    fn config_with_replicas(replicas: usize) -> ClusterConfig {
        ClusterConfig { replicas, ..config(1) }
    }

    #[tokio::test]
    async fn an_expert_given_its_own_replica_count_gets_it() {
        let config = ClusterConfig { expert_replicas: [(3, 3)].into(), ..config_with_replicas(1) };
        let cluster = Cluster::new(config, Arc::new(FakeControl::default()), CoordinatorMetrics::default());
        for endpoint in ["a", "b", "c"] {
            cluster.register(registration(endpoint)).expect("register");
        }
        cluster.reconcile_once().await;
        let holders: Vec<usize> = cluster.table().routes.iter().map(|route| route.endpoints.len()).collect();
        assert_eq!(holders, [1, 1, 1, 3, 1, 1, 1, 1]);
    }

    #[tokio::test]
    async fn replicas_put_each_expert_on_that_many_workers() {
        let control = Arc::new(FakeControl::default());
        let cluster = Cluster::new(config_with_replicas(2), control.clone(), CoordinatorMetrics::default());
        for endpoint in ["a", "b", "c"] {
            cluster.register(registration(endpoint)).expect("register");
        }
        cluster.reconcile_once().await;
        let table = cluster.table();
        for route in &table.routes {
            assert_eq!(route.endpoints.len(), 2, "{route:?}");
            assert_ne!(route.endpoints[0], route.endpoints[1]);
        }
        let per_worker: Vec<usize> = cluster.status().workers.iter().map(|worker| worker.experts.len()).collect();
        assert!(per_worker.iter().all(|count| (5..=6).contains(count)), "16 replicas over 3 workers: {per_worker:?}");
    }

    /// Keeps `alive` heartbeating while `run` reconciles in the background, until `done` holds.
    async fn heartbeat_until(
        cluster: &Cluster<Arc<FakeControl>>,
        alive: &[WorkerId],
        within: Duration,
        done: impl Fn(&v1::RoutingTable) -> bool,
    ) -> Duration {
        let started = Instant::now();
        while started.elapsed() < within {
            for id in alive {
                cluster.heartbeat(PROTOCOL_VERSION, &id.0, 0, 0, &[]).expect("alive");
            }
            if done(&cluster.table()) {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("not done within {within:?}: {:?}", cluster.table());
    }

    fn stop_on(
        cluster: &Arc<Cluster<Arc<FakeControl>>>,
    ) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(cluster.clone().run(async move {
            let _ = stopped.await;
        }));
        (stop, task)
    }

    /// A joiner whose LoadExperts never returns must not keep a dead worker in the table: expiry
    /// runs on its own timer, and the dead worker's experts fall back to their other holder.
    #[tokio::test]
    async fn a_hung_load_does_not_keep_a_dead_worker_in_the_table() {
        let control = Arc::new(FakeControl::default());
        control.hanging.lock().expect("lock").insert("c".into());
        let cluster = Cluster::new(config_with_replicas(2), control.clone(), CoordinatorMetrics::default());
        let (a, _) = cluster.register(registration("a")).expect("register");
        cluster.register(registration("b")).expect("register");
        cluster.reconcile_once().await;
        let (stop, task) = stop_on(&cluster);
        let (c, _) = cluster.register(registration("c")).expect("register");
        let routes_to = |endpoint: &'static str| {
            move |table: &v1::RoutingTable| {
                table.routes.iter().any(|route| route.endpoints.iter().any(|e| e == endpoint))
            }
        };
        // c's load hangs: b stops heartbeating and is dropped within the timeout (200 ms) anyway.
        let took =
            heartbeat_until(&cluster, &[a.clone(), c.clone()], Duration::from_secs(2), |table| !routes_to("b")(table))
                .await;
        assert!(took < Duration::from_millis(400), "b dropped after {took:?}");
        assert!(endpoints_by_expert(&cluster.table()).iter().all(|owners| owners == "a"), "a holds every expert");
        let _ = stop.send(());
        task.await.expect("run stops");
    }

    /// A late worker that refuses connections is removed at once, not after the full timeout.
    #[tokio::test]
    async fn a_late_worker_that_refuses_connections_is_removed_without_waiting_for_the_timeout() {
        let control = Arc::new(FakeControl::default());
        let config = ClusterConfig { heartbeat_timeout: Duration::from_secs(30), ..config_with_replicas(2) };
        let cluster = Cluster::new(config, control.clone(), CoordinatorMetrics::default());
        let (a, _) = cluster.register(registration("a")).expect("register");
        cluster.register(registration("b")).expect("register");
        cluster.reconcile_once().await;
        control.gone.lock().expect("lock").insert("b".into());
        let (stop, task) = stop_on(&cluster);
        let took = heartbeat_until(&cluster, &[a], Duration::from_secs(5), |table| {
            table.routes.iter().all(|route| route.endpoints == ["a"])
        })
        .await;
        assert!(took < Duration::from_millis(200), "b removed after {took:?}, timeout 30 s");
        let _ = stop.send(());
        task.await.expect("run stops");
    }

    #[tokio::test]
    async fn a_draining_workers_experts_move_before_it_is_told_it_may_stop() {
        let control = Arc::new(FakeControl::default());
        let cluster = Cluster::new(config(2), control.clone(), CoordinatorMetrics::default());
        cluster.register(registration("a")).expect("register");
        let (b, _) = cluster.register(registration("b")).expect("register");
        cluster.reconcile_once().await;
        let (routed, _) = cluster.drain(PROTOCOL_VERSION, &b.0).expect("drain");
        assert_eq!(routed, 4, "b still serves its experts until a holds them");
        assert!(cluster.status().workers.iter().any(|worker| worker.draining));
        cluster.reconcile_once().await;
        let (routed, version) = cluster.drain(PROTOCOL_VERSION, &b.0).expect("drain");
        assert_eq!((routed, version), (0, cluster.table().version));
        assert!(endpoints_by_expert(&cluster.table()).iter().all(|owners| owners == "a"));
        assert_eq!(control.unloads.lock().expect("lock").len(), 1, "b's copies are unloaded after the grace");
        assert!(cluster.drain(PROTOCOL_VERSION, "w404").is_err());
    }

    /// Workers rejoining a restarted coordinator keep what they hold: no expert is loaded again,
    /// even when the first one to rejoin could take everything.
    #[tokio::test]
    async fn a_restarted_coordinator_adopts_what_rejoining_workers_hold() {
        let control = Arc::new(FakeControl::default());
        let cluster = Cluster::new(config(1), control.clone(), CoordinatorMetrics::default());
        let holding = |endpoint: &str, experts: std::ops::Range<u32>| Registration {
            loaded_experts: experts.map(|e| ExpertId::new(0, e)).collect(),
            ..registration(endpoint)
        };
        cluster.register(holding("a", 0..4)).expect("register");
        cluster.reconcile_once().await;
        assert_eq!(cluster.table().version, 0, "waits for the holders of experts 4..8");
        cluster.register(holding("b", 4..8)).expect("register");
        cluster.reconcile_once().await;
        let owners = endpoints_by_expert(&cluster.table());
        assert_eq!(owners, ["a", "a", "a", "a", "b", "b", "b", "b"]);
        assert!(control.loads.lock().expect("lock").is_empty(), "nothing loaded again");
        assert!(control.unloads.lock().expect("lock").is_empty(), "nothing unloaded");
    }

    #[tokio::test]
    async fn a_lone_rejoining_worker_gets_the_rest_once_the_wait_is_over() {
        let control = Arc::new(FakeControl::default());
        let cluster = Cluster::new(config(1), control.clone(), CoordinatorMetrics::default());
        let holding = Registration { loaded_experts: vec![ExpertId::new(0, 0)], ..registration("a") };
        let (a, _) = cluster.register(holding).expect("register");
        cluster.reconcile_once().await;
        assert!(control.loads.lock().expect("lock").is_empty());
        tokio::time::sleep(config(1).heartbeat_timeout).await;
        cluster.heartbeat(PROTOCOL_VERSION, &a.0, 0, 0, &[]).expect("alive");
        cluster.reconcile_once().await;
        assert!(endpoints_by_expert(&cluster.table()).iter().all(|owners| owners == "a"));
    }

    /// EPLB end to end over the plain struct: the traffic workers report makes the hot expert's
    /// route name two workers, and the measured imbalance is published as a metric.
    #[tokio::test]
    async fn measured_traffic_gives_the_hot_expert_a_redundant_replica() {
        let config = ClusterConfig {
            balancing: Some(Balancing { interval: Duration::from_millis(1), redundant: 1 }),
            ..config(2)
        };
        let metrics = CoordinatorMetrics::default();
        let cluster = Cluster::new(config, Arc::new(FakeControl::default()), metrics.clone());
        let (a, _) = cluster.register(registration("a")).expect("register");
        let (b, _) = cluster.register(registration("b")).expect("register");
        cluster.reconcile_once().await;
        assert!(cluster.table().routes.iter().all(|route| route.endpoints.len() == 1));
        let hot = ExpertId::new(0, 0);
        let owner_of_hot = if cluster.table().routes[0].endpoints == ["a"] { &a } else { &b };
        let mut offered = vec![(hot, 0)];
        offered.extend((1..4).map(|e| (ExpertId::new(0, e), 0)));
        cluster.heartbeat(PROTOCOL_VERSION, &owner_of_hot.0, 0, 0, &offered).expect("alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
        offered = vec![(hot, 9_000)];
        offered.extend((1..8).map(|e| (ExpertId::new(0, e), 100)));
        cluster.heartbeat(PROTOCOL_VERSION, &owner_of_hot.0, 0, 0, &offered).expect("alive");
        cluster.rebalance_by_traffic();
        cluster.reconcile_once().await;
        let table = cluster.table();
        assert_eq!(table.routes[0].endpoints.len(), 2, "the hot expert on both workers: {:?}", table.routes[0]);
        assert!(table.routes[1..].iter().all(|route| route.endpoints.len() == 1));
        assert!(scrape(&metrics).contains("switchyard_coordinator_load_imbalance "), "{}", scrape(&metrics));
    }
}
