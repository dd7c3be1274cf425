//! [`Cluster`]: the coordinator's logic as a plain struct, tested without a network.
//!
//! Membership (register, heartbeat, drain, expiry) updates the state under a short lock and runs
//! on its own timer, so a worker's death is published even while another worker's load is stuck.
//! Placement changes come from reconcile rounds: a round plans ([`crate::placement::plan`]) and
//! orders the loads; each load runs as its own task and, when it completes, the table is
//! republished. The table only names experts a worker holds: an expert on its way to a new holder
//! stays routed to its old one (make-before-break), which unloads it once a grace period has passed
//! so clients still on the previous table are not cut off. `membership`, `placing` and
//! `publishing` hold those three parts.

mod membership;
mod placing;
mod publishing;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use switchyard_model::{ExpertId, ModelSpec, WeightDtype};
use switchyard_proto::v1;
use tokio::sync::{Notify, watch};
use tokio_stream::wrappers::WatchStream;

use crate::balance::{Balance, Balancer, Eplb, Traffic};
use crate::control::WorkerControl;
use crate::metrics::CoordinatorMetrics;
use crate::placement::{Placement, WorkerId, holders};

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub model: ModelSpec,
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is removed and its experts placed on the survivors. A worker
    /// that misses one heartbeat is probed: one that refuses connections is removed at once.
    pub heartbeat_timeout: Duration,
    /// Workers to wait for before the first placement (so experts do not all land on the first).
    pub min_workers: usize,
    /// Most workers registered at once; a registration beyond them is refused until one leaves.
    pub max_workers: usize,
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
    /// Endpoints refused at `--max-workers` since they last registered, so that a worker retrying
    /// is warned of once, not every retry; at most [`REMEMBERED_REFUSALS`] of them.
    refused_at_the_cap: BTreeSet<String>,
}

/// The most endpoints refused at the cap that the coordinator remembers (then it forgets them all):
/// a bound on what peers registering without end can make it hold.
const REMEMBERED_REFUSALS: usize = 1024;

// Lock order: `state`, then `traffic`; never the other way round.

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
        metrics.max_workers.set(i64::try_from(config.max_workers).unwrap_or(i64::MAX));
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

    pub fn table(&self) -> Arc<v1::RoutingTable> {
        self.table.borrow().clone()
    }

    /// The tables a watcher holding version `newer_than` of `epoch` has yet to see: the current one
    /// if it is newer or another coordinator's (a restarted one counts from 1 again), then each new
    /// version. Never version 0, the placeholder before the first placement: a client that holds a
    /// restarted coordinator's predecessor's table keeps routing by it until the new one places
    /// experts.
    pub fn tables_after(&self, newer_than: u64, epoch: u64) -> impl Stream<Item = Arc<v1::RoutingTable>> + use<C> {
        WatchStream::new(self.table.subscribe()).filter(move |table| {
            std::future::ready(table.version > 0 && (table.epoch != epoch || table.version > newer_than))
        })
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
            max_workers: u32::try_from(self.config.max_workers).unwrap_or(u32::MAX),
        }
    }

    /// Reconciles until `shutdown` resolves: on every registration, drain and finished load, and
    /// every heartbeat interval; membership is watched meanwhile on its own timer, in this task, so
    /// that a panic in either ends both (and `crate::run` with them) rather than one alone.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let membership = self.clone().watch_membership();
        tokio::pin!(membership);
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
                () = &mut membership => {}
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.config.heartbeat_interval) => {}
            }
        }
    }

    /// One round, waiting for its loads and unloads (what `run` does in tasks): for tests and tools.
    pub async fn reconcile_once(&self) {
        let orders = self.plan_round();
        futures::future::join_all(orders.into_iter().map(|order| self.load(order))).await;
        self.unload(self.due_unloads()).await;
    }
}

#[cfg(test)]
pub(crate) mod tests;
