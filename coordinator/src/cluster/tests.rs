use switchyard_proto::PROTOCOL_VERSION;

use super::*;
use crate::control::{ControlError, ExpertLoad};
use crate::error::CoordinatorError;

/// (endpoint, experts) of one recorded call.
type Call = (String, Vec<ExpertId>);

/// Records every call; fails loads to the endpoints in `failing`, never finishes those to
/// `hanging`, and finds nothing listening at those in `gone`.
#[derive(Debug, Default)]
pub(crate) struct FakeControl {
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

pub(crate) fn config(min_workers: usize) -> ClusterConfig {
    ClusterConfig {
        model: ModelSpec { d_model: 8, d_ff: 16, ..ModelSpec::default_synthetic() },
        heartbeat_interval: Duration::from_millis(10),
        heartbeat_timeout: Duration::from_millis(200),
        min_workers,
        max_workers: 64,
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
    assert_eq!(beat(&a), HeartbeatReply { table_version: beat(&a).table_version, placed: false, experts_to_load: 0 });

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
    let metrics = CoordinatorMetrics::default();
    let cluster = Cluster::new(config(2), control.clone(), metrics.clone());
    let (a, _) = cluster.register(registration("a")).expect("register");
    cluster.register(registration("b")).expect("register");
    cluster.reconcile_once().await;
    outlive_the_timeout(&cluster, &a).await;
    cluster.reconcile_once().await;
    let table = cluster.table();
    assert_eq!(table.version, 4, "b's routes dropped (3), then its experts loaded on a (4)");
    assert!(endpoints_by_expert(&table).iter().all(|owner| owner == "a"));
    let loads = control.loads.lock().expect("lock");
    assert_eq!(loads.last().map(|(endpoint, experts)| (endpoint.as_str(), experts.len())), Some(("a", 8)));
    let status = cluster.status();
    assert_eq!(status.workers.len(), 1);
    assert!(status.unplaced_experts.is_empty());
    let text = scrape(&metrics);
    assert!(text.lines().any(|line| line == "switchyard_coordinator_worker_expirations_total 1"), "{text}");
}

/// Heartbeats `alive` every 10 ms for 300 ms, past `config`'s 200 ms timeout: every other worker
/// falls silent.
async fn outlive_the_timeout(cluster: &Cluster<Arc<FakeControl>>, alive: &WorkerId) {
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        cluster.heartbeat(PROTOCOL_VERSION, &alive.0, 0, 0, &[]).expect("alive");
    }
}

/// The membership timer's check alone (no reconcile round) takes a silent worker out of the table,
/// and publishes nothing while every worker is heard from.
#[tokio::test]
async fn the_membership_check_drops_a_silent_workers_routes_at_once() {
    let control = Arc::new(FakeControl::default());
    let cluster = Cluster::new(config(2), control.clone(), CoordinatorMetrics::default());
    let (a, _) = cluster.register(registration("a")).expect("register");
    cluster.register(registration("b")).expect("register");
    cluster.reconcile_once().await;
    let loaded = cluster.table().version;
    cluster.check_membership();
    assert_eq!(cluster.table().version, loaded, "both heard from: nothing to publish");
    outlive_the_timeout(&cluster, &a).await;
    cluster.check_membership();
    let table = cluster.table();
    assert_eq!(table.version, loaded + 1, "b's routes dropped");
    let owners = endpoints_by_expert(&table);
    assert_eq!((owners.iter().filter(|owner| *owner == "a").count(), owners.len()), (4, 8));
    assert!(owners.iter().all(|owner| owner == "a" || owner.is_empty()), "{owners:?}");
    assert_eq!(cluster.status().workers.len(), 1);
}

/// A table watcher is sent what it has not seen: nothing before the first placement, the current
/// table if newer than its own or another coordinator's, then each new version.
#[tokio::test]
async fn a_watcher_is_sent_only_the_tables_it_has_not_seen() {
    use futures::{FutureExt, StreamExt};
    let cluster = Cluster::new(config(1), Arc::new(FakeControl::default()), CoordinatorMetrics::default());
    let epoch = cluster.epoch();
    let sent_now = |newer_than: u64, epoch: u64| {
        let mut tables = Box::pin(cluster.tables_after(newer_than, epoch));
        tables.next().now_or_never().map(|table| table.map(|table| table.version))
    };
    assert_eq!(sent_now(0, epoch), None, "the placeholder before the first placement");
    assert_eq!(sent_now(0, epoch + 1), None, "not even to another coordinator's watcher");
    cluster.register(registration("a")).expect("register");
    cluster.reconcile_once().await;
    assert_eq!(cluster.table().version, 1);
    assert_eq!(sent_now(0, epoch), Some(Some(1)), "newer than the watcher's");
    assert_eq!(sent_now(1, epoch), None, "the watcher's own version");
    assert_eq!(sent_now(7, epoch + 1), Some(Some(1)), "a restarted coordinator counts from 1 again");

    let mut watching = Box::pin(cluster.tables_after(1, epoch));
    assert!(watching.next().now_or_never().is_none());
    cluster.register(registration("b")).expect("register");
    cluster.reconcile_once().await;
    assert_eq!(cluster.table().version, 2, "the joiner's load landed");
    let next = watching.next().now_or_never().flatten().map(|table| table.version);
    assert_eq!(next, Some(2), "each new version");
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

/// A cluster of `config` whose experts were all placed on worker "a", which "b" has just joined
/// (not placed yet): its control, itself, and b's id.
async fn b_joins_a(config: ClusterConfig) -> (Arc<FakeControl>, Arc<Cluster<Arc<FakeControl>>>, WorkerId) {
    let control = Arc::new(FakeControl::default());
    let cluster = Cluster::new(config, control.clone(), CoordinatorMetrics::default());
    cluster.register(registration("a")).expect("register");
    cluster.reconcile_once().await;
    let (b, _) = cluster.register(registration("b")).expect("register");
    (control, cluster, b)
}

/// A DeepSeek-sized layer (64 experts here): each expert is under 5% of the first worker's load,
/// and the second worker that joins (a scale-out) still takes half of them.
#[tokio::test]
async fn a_joiner_takes_half_of_a_layer_of_many_small_experts() {
    let mut config = config(1);
    config.model.experts_per_layer = 64;
    let (control, cluster, _) = b_joins_a(config).await;
    cluster.reconcile_once().await;
    let owners = endpoints_by_expert(&cluster.table());
    assert_eq!(owners.iter().filter(|owner| *owner == "b").count(), 32, "{owners:?}");
    let unloads = control.unloads.lock().expect("lock");
    assert_eq!(unloads.iter().map(|(_, experts)| experts.len()).sum::<usize>(), 32, "a unloads what b took");
}

/// Make-before-break: while the joiner is still loading the experts planned for it, the table
/// routes them to their old holder, and neither worker is told to unload anything.
#[tokio::test]
async fn nothing_is_unloaded_while_the_new_holder_is_still_loading() {
    let (_, cluster, b) = b_joins_a(config(1)).await;
    let orders = cluster.plan_round();
    assert_eq!(orders.iter().map(|order| (&order.worker, order.experts.len())).collect::<Vec<_>>(), [(&b, 4)]);
    assert!(endpoints_by_expert(&cluster.table()).iter().all(|owner| owner == "a"), "b holds nothing yet");
    assert_eq!(cluster.due_unloads(), [], "a still serves what b is loading");
    for order in orders {
        cluster.finish_load(order, Ok(()));
    }
    let due = cluster.due_unloads();
    assert_eq!(
        due.iter().map(|(endpoint, experts)| (endpoint.as_str(), experts.len())).collect::<Vec<_>>(),
        [("a", 4)]
    );
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

/// A shared expert four times a routed one's size costs four times as much per token: taking the
/// same tokens as all eight routed experts together, it does four times their work, and its
/// worker is given no routed expert beside it.
#[tokio::test]
async fn measured_traffic_weighs_each_token_by_the_size_of_the_expert_it_goes_to() {
    let mut config =
        ClusterConfig { balancing: Some(Balancing { interval: Duration::from_millis(1), redundant: 0 }), ..config(2) };
    (config.model.shared_experts, config.model.shared_d_ff) = (1, 4 * config.model.d_ff);
    let cluster = Cluster::new(config, Arc::new(FakeControl::default()), CoordinatorMetrics::default());
    let (a, _) = cluster.register(registration("a")).expect("register");
    cluster.register(registration("b")).expect("register");
    cluster.reconcile_once().await;
    let counts = |routed: u64, shared: u64| -> Vec<(ExpertId, u64)> {
        (0..8).map(|e| (ExpertId::new(0, e), routed)).chain([(ExpertId::new(0, 8), shared)]).collect()
    };
    cluster.heartbeat(PROTOCOL_VERSION, &a.0, 0, 0, &counts(0, 0)).expect("alive");
    tokio::time::sleep(Duration::from_millis(20)).await;
    cluster.heartbeat(PROTOCOL_VERSION, &a.0, 0, 0, &counts(1, 8)).expect("alive");
    cluster.rebalance_by_traffic();
    cluster.reconcile_once().await;
    let owners = endpoints_by_expert(&cluster.table());
    let shared_holder = &owners[8];
    assert!(owners[..8].iter().all(|owner| owner != shared_holder), "{owners:?}");
}

/// Counters near `u64::MAX` make rates of ~1.8e19 tokens a second, whose loads summed over a
/// worker's experts would wrap (found by `service::tests::hostile_peers`, this crate's arithmetic
/// being overflow-checked): each replica's load is bounded, and every expert is still placed.
#[tokio::test]
async fn counters_near_the_top_of_u64_still_place_every_expert() {
    let config =
        ClusterConfig { balancing: Some(Balancing { interval: Duration::from_millis(1), redundant: 1 }), ..config(2) };
    let cluster = Cluster::new(config, Arc::new(FakeControl::default()), CoordinatorMetrics::default());
    let (a, _) = cluster.register(registration("a")).expect("register");
    cluster.register(registration("b")).expect("register");
    cluster.reconcile_once().await;
    let counts: Vec<(ExpertId, u64)> = (0..8).map(|e| (ExpertId::new(0, e), u64::MAX - u64::from(e))).collect();
    cluster.heartbeat(PROTOCOL_VERSION, &a.0, 0, 0, &counts).expect("alive");
    tokio::time::sleep(Duration::from_millis(20)).await;
    cluster.rebalance_by_traffic();
    cluster.reconcile_once().await;
    let status = cluster.status();
    assert!(status.unplaced_experts.is_empty(), "{status:?}");
    assert_eq!(endpoints_by_expert(&cluster.table()).len(), 8);
}

/// Each failed load doubles the wait before the worker is asked again, from one heartbeat
/// interval up to a minute.
#[tokio::test]
async fn a_worker_whose_loads_keep_failing_is_asked_again_ever_later() {
    let mut config = config(2);
    (config.heartbeat_interval, config.heartbeat_timeout) = (Duration::from_secs(1), Duration::from_secs(600));
    let cluster = Cluster::new(config, Arc::new(FakeControl::default()), CoordinatorMetrics::default());
    cluster.register(registration("a")).expect("register");
    let (b, _) = cluster.register(registration("b")).expect("register");
    for (failures, wait_s) in [1, 2, 4, 8, 16, 32, 60, 60].into_iter().enumerate() {
        let order = cluster.plan_round().into_iter().find(|order| order.worker == b).expect("b is asked");
        let refused = ControlError::Refused {
            endpoint: "b".into(),
            code: tonic::Code::FailedPrecondition,
            message: "out of memory".into(),
        };
        cluster.finish_load(order, Err(refused));
        let mut state = cluster.lock();
        let record = state.workers.get_mut(&b).expect("registered");
        let wait = record.retry_load_after.expect("backing off").saturating_duration_since(Instant::now());
        let expected = Duration::from_secs(wait_s);
        assert!(wait <= expected && wait > expected - Duration::from_millis(500), "failure {}: {wait:?}", failures + 1);
        // As if the wait were over.
        record.retry_load_after = None;
    }
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
    let longest = Registration { name: "é".repeat(256), ..registration("z") };
    assert!(cluster.register(longest).is_ok(), "256 characters (512 bytes) is the limit, not past it");
    // Under mutual TLS a worker id is bound to the certificate that registered it.
    let (id, _) = cluster.register(Registration { identity: Some(vec![1]), ..registration("a") }).expect("register");
    assert_eq!(cluster.check_owner(&id.0, Some(&[1])), Ok(()));
    let stolen = cluster.check_owner(&id.0, Some(&[2])).unwrap_err();
    assert_eq!(stolen.to_string(), format!("worker_id: worker '{id}' was registered over another certificate"));
    assert_eq!(tonic::Status::from(stolen).code(), tonic::Code::PermissionDenied);
    assert!(cluster.check_owner(&id.0, None).is_err(), "nor without a certificate");
    let error = cluster.heartbeat(PROTOCOL_VERSION, "w404", 0, 0, &[]).unwrap_err();
    assert_eq!(error, CoordinatorError::UnknownWorker("w404".into()));
    assert_eq!(tonic::Status::from(error).code(), tonic::Code::NotFound);
}

/// Past `max_workers` a registration is refused as exhausted, not as malformed; a restarted
/// worker (the same endpoint) is still taken, and a newcomer once a registered worker is gone.
#[tokio::test]
async fn registrations_past_the_most_workers_wait_until_one_leaves() {
    let metrics = CoordinatorMetrics::default();
    let cluster =
        Cluster::new(ClusterConfig { max_workers: 2, ..config(1) }, Arc::new(FakeControl::default()), metrics.clone());
    assert_eq!(metrics.max_workers.get(), 2, "the cap, as a gauge");
    cluster.register(registration("a")).expect("the first");
    cluster.register(registration("b")).expect("the second");
    let refused = cluster.register(registration("c")).unwrap_err();
    assert_eq!(refused, CoordinatorError::TooManyWorkers { limit: 2 });
    assert!(refused.to_string().contains("2 workers are registered") && refused.to_string().contains("--max-workers"));
    assert_eq!(tonic::Status::from(refused).code(), tonic::Code::ResourceExhausted);
    let (a, _) = cluster.register(registration("a")).expect("a restarted worker takes its own place");
    let endpoints = |cluster: &Cluster<Arc<FakeControl>>| {
        let mut endpoints: Vec<_> = cluster.status().workers.into_iter().map(|worker| worker.endpoint).collect();
        endpoints.sort();
        endpoints
    };
    assert_eq!(endpoints(&cluster), ["a", "b"]);
    outlive_the_timeout(&cluster, &a).await;
    cluster.check_membership();
    cluster.register(registration("c")).expect("b's place, once b is gone");
    assert_eq!(endpoints(&cluster), ["a", "c"]);
}

/// A worker retrying past the cap is warned of once: its endpoint is remembered until it
/// registers, and no more endpoints than the bound are.
#[tokio::test]
async fn refusals_at_the_cap_are_remembered_per_endpoint_until_it_registers() {
    let cluster = Cluster::new(
        ClusterConfig { max_workers: 1, ..config(1) },
        Arc::new(FakeControl::default()),
        CoordinatorMetrics::default(),
    );
    let remembered = |cluster: &Cluster<Arc<FakeControl>>| cluster.lock().refused_at_the_cap.clone();
    cluster.register(registration("a")).expect("the first");
    for _ in 0..3 {
        cluster.register(registration("b")).expect_err("b is past the cap");
    }
    assert_eq!(remembered(&cluster), ["b".to_owned()].into(), "once, however often it retries");
    for index in 0..super::REMEMBERED_REFUSALS {
        cluster.register(registration(&format!("spare-{index}"))).expect_err("past the cap");
    }
    assert!(remembered(&cluster).len() <= super::REMEMBERED_REFUSALS, "bounded");
    cluster.register(registration("b")).expect_err("b again");
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.check_membership();
    cluster.register(registration("b")).expect("b takes a's place once a fell silent");
    assert!(!remembered(&cluster).contains("b"), "forgotten once registered");
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

/// `run` does on its own what the tests above do round by round: it places every expert on the
/// first worker, moves half to a joiner and, once the joiner holds them, unloads them from their
/// old holder; and it returns at shutdown.
#[tokio::test]
async fn run_moves_experts_to_a_joiner_and_unloads_them_from_the_old_holder() {
    let control = Arc::new(FakeControl::default());
    let cluster = Cluster::new(config(1), control.clone(), CoordinatorMetrics::default());
    let (stop, running) = stop_on(&cluster);
    let (a, _) = cluster.register(registration("a")).expect("register");
    let all_on_a = |table: &v1::RoutingTable| endpoints_by_expert(table).iter().all(|owner| owner == "a");
    heartbeat_until(&cluster, std::slice::from_ref(&a), Duration::from_secs(10), |table| {
        table.version > 0 && all_on_a(table)
    })
    .await;
    let (b, _) = cluster.register(registration("b")).expect("register");
    let unloaded = || control.unloads.lock().expect("lock").clone();
    heartbeat_until(&cluster, &[a, b], Duration::from_secs(10), |_| !unloaded().is_empty()).await;
    assert_eq!(unloaded(), [("a".to_owned(), (4..8).map(|e| ExpertId::new(0, e)).collect::<Vec<_>>())]);
    let owners = endpoints_by_expert(&cluster.table());
    assert_eq!(owners.iter().filter(|owner| *owner == "b").count(), 4, "{owners:?}");
    stop.send(()).expect("run is running");
    tokio::time::timeout(Duration::from_secs(10), running).await.expect("run returns at shutdown").expect("no panic");
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
        move |table: &v1::RoutingTable| table.routes.iter().any(|route| route.endpoints.iter().any(|e| e == endpoint))
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

/// Only a worker past one and a half heartbeat intervals is probed, and not again while its probe
/// is out.
#[tokio::test]
async fn only_a_late_worker_is_probed_and_once_at_a_time() {
    let mut config = config(1);
    (config.heartbeat_interval, config.heartbeat_timeout) = (Duration::from_millis(100), Duration::from_secs(10));
    let cluster = Cluster::new(config, Arc::new(FakeControl::default()), CoordinatorMetrics::default());
    let (on_time, _) = cluster.register(registration("a")).expect("register");
    let (late, _) = cluster.register(registration("b")).expect("register");
    assert!(cluster.late_workers().is_empty(), "both just registered");
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.heartbeat(PROTOCOL_VERSION, &on_time.0, 0, 0, &[]).expect("a is alive");
    assert_eq!(cluster.late_workers(), [(late, "b".to_owned())]);
    assert!(cluster.late_workers().is_empty(), "b's probe is still out");
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
    assert_eq!(cluster.drain(PROTOCOL_VERSION, "w404"), Err(CoordinatorError::UnknownWorker("w404".into())));
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
    let config =
        ClusterConfig { balancing: Some(Balancing { interval: Duration::from_millis(1), redundant: 1 }), ..config(2) };
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
