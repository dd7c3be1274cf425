//! Routing tables as a client reads them, changed (a coordinator of another version, or a bug of
//! its own): the model's spec at the edges of its fields, routes naming experts outside the model,
//! several times, or none at all, endpoints that no worker answers, queue bounds of 0 and 2^32-1.
//! A table is refused naming its version, or every layer call over it ends: with an output of the
//! call's shape (exact where the table still says what the worker serves), or with an error that
//! names what was wrong, never a panic, a hang or an internal error. The worker is a real one, in
//! process, holding every expert of the model.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use switchyard_expert_worker::ExpertWorker;
use switchyard_model::{ModelSpec, TableVersion};
use switchyard_proto::v1;
use switchyard_reference::in_process::InProcessTransport;
use switchyard_router_client::{ClientError, ClientOptions, MoeClient, RoutingTableView};
use tokio::sync::watch;

use crate::support;

const TOKENS: usize = 8;
const WIDTH: usize = 16;
const VERSION: u64 = 7;

fn model() -> ModelSpec {
    ModelSpec { d_model: WIDTH as u32, d_ff: 32, seed: 5, ..ModelSpec::default_synthetic() }
}

fn hidden() -> Vec<f32> {
    (0..TOKENS * WIDTH).map(|i| ((i as f32) * 0.29).cos()).collect()
}

/// The table the coordinator publishes for the worker: every expert of layer 0 on "a".
fn true_table() -> v1::RoutingTable {
    let routes = (0..8)
        .map(|expert| v1::ExpertRoute { expert: Some(v1::ExpertKey::new(0, expert)), endpoints: vec!["a".into()] })
        .collect();
    v1::RoutingTable {
        version: VERSION,
        epoch: 1,
        model: Some(model().to_proto()),
        routes,
        queue_limit_tokens: 1 << 20,
        max_batch_tokens: 1 << 20,
    }
}

/// One change to a table.
#[derive(Debug, Clone)]
enum Change {
    TopK(u32),
    CapacityFactor(f32),
    ExpertCapacity(u32),
    Dropless(bool),
    ExpertsPerLayer(u32),
    DModel(u32),
    DFf(u32),
    SharedExperts(u32, u32),
    MoeLayers(Vec<u32>),
    Router {
        scoring: i32,
        groups: u32,
        top_groups: u32,
        group_score: i32,
        scaling: f32,
    },
    KeepTopKSoftmax(bool),
    ModelMissing,
    /// The route at this index (modulo the routes) names this expert of this layer instead.
    RouteExpert(usize, u32, u32),
    RouteMissing(usize),
    RouteRepeated(usize),
    /// Every route's endpoints become these.
    Endpoints(Vec<String>),
    QueueBounds(u32, u32),
}

impl Change {
    fn apply(&self, table: &mut v1::RoutingTable) {
        let route = |index: &usize| index % table.routes.len().max(1);
        // A change to the model of a table that has none is no change.
        let mut no_model = v1::ModelSpec::default();
        let model = table.model.as_mut().unwrap_or(&mut no_model);
        match self {
            Change::TopK(k) => model.top_k = *k,
            Change::CapacityFactor(factor) => model.capacity_factor = *factor,
            Change::ExpertCapacity(capacity) => model.expert_capacity = *capacity,
            Change::Dropless(dropless) => model.dropless = *dropless,
            Change::ExpertsPerLayer(experts) => model.experts_per_layer = *experts,
            Change::DModel(width) => model.d_model = *width,
            Change::DFf(width) => model.d_ff = *width,
            Change::SharedExperts(count, width) => (model.shared_experts, model.shared_d_ff) = (*count, *width),
            Change::MoeLayers(layers) => model.moe_layers = layers.clone(),
            Change::Router { scoring, groups, top_groups, group_score, scaling } => {
                model.router = Some(v1::RouterSpec {
                    scoring: *scoring,
                    groups: *groups,
                    top_groups: *top_groups,
                    group_score: *group_score,
                    scaling: *scaling,
                    ..Default::default()
                })
            }
            Change::KeepTopKSoftmax(keep) => model.keep_topk_softmax_weights = *keep,
            Change::ModelMissing => table.model = None,
            Change::RouteExpert(index, layer, expert) => {
                let index = route(index);
                if let Some(route) = table.routes.get_mut(index) {
                    route.expert = Some(v1::ExpertKey::new(*layer, *expert));
                }
            }
            Change::RouteMissing(index) => {
                if !table.routes.is_empty() {
                    let index = route(index);
                    table.routes.remove(index);
                }
            }
            Change::RouteRepeated(index) => {
                if let Some(repeated) = table.routes.get(route(index)).cloned() {
                    table.routes.push(v1::ExpertRoute { endpoints: vec!["nobody".into()], ..repeated });
                }
            }
            Change::Endpoints(endpoints) => {
                table.routes.iter_mut().for_each(|route| route.endpoints = endpoints.clone())
            }
            Change::QueueBounds(queue, batch) => (table.queue_limit_tokens, table.max_batch_tokens) = (*queue, *batch),
        }
    }
}

fn change() -> impl Strategy<Value = Change> {
    let count = || prop_oneof![Just(0u32), 1..10u32, Just(u32::MAX), Just(1 << 31)];
    let factor = prop_oneof![
        Just(0.0f32),
        Just(f32::MIN_POSITIVE),
        Just(1.0),
        Just(1e30),
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(-1.0)
    ];
    let endpoint = prop_oneof![Just("a".to_owned()), Just("nobody".to_owned()), Just(String::new()), ".{0,12}"];
    prop_oneof![
        count().prop_map(Change::TopK),
        factor.clone().prop_map(Change::CapacityFactor),
        count().prop_map(Change::ExpertCapacity),
        any::<bool>().prop_map(Change::Dropless),
        count().prop_map(Change::ExpertsPerLayer),
        count().prop_map(Change::DModel),
        count().prop_map(Change::DFf),
        (0..3u32, count()).prop_map(|(count, width)| Change::SharedExperts(count, width)),
        proptest::collection::vec(prop_oneof![0..3u32, Just(u32::MAX)], 0..3).prop_map(Change::MoeLayers),
        (0..3i32, prop_oneof![Just(1u32), Just(2), Just(4), count()], count(), 0..3i32, factor).prop_map(
            |(scoring, groups, top_groups, group_score, scaling)| {
                Change::Router { scoring, groups, top_groups, group_score, scaling }
            }
        ),
        any::<bool>().prop_map(Change::KeepTopKSoftmax),
        Just(Change::ModelMissing),
        (any::<usize>(), prop_oneof![Just(0u32), 1..3u32, Just(u32::MAX)], count())
            .prop_map(|(index, layer, expert)| Change::RouteExpert(index, layer, expert)),
        any::<usize>().prop_map(Change::RouteMissing),
        any::<usize>().prop_map(Change::RouteRepeated),
        proptest::collection::vec(endpoint, 0..3).prop_map(Change::Endpoints),
        (count(), count()).prop_map(|(queue, batch)| Change::QueueBounds(queue, batch)),
    ]
}

/// Whether the changed table still says what the worker serves, so the call's output must be the
/// true table's: the same model and every expert on "a" alone. A bound past what the call asks
/// changes nothing either.
fn still_true(table: &v1::RoutingTable) -> bool {
    let true_table = true_table();
    let bounds_room = table.max_batch_tokens == 0 || table.max_batch_tokens as usize >= TOKENS;
    table.model == true_table.model && table.routes == true_table.routes && bounds_room
}

/// What a call over a changed table may fail with: what the caller asked does not fit the model
/// (its width), an expert has no worker or an unknown one, the worker refused the request it
/// was sent (an expert it does not serve, rows not its width), or a queue bound refused it.
fn names_what_was_wrong(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::InvalidInput { .. }
            | ClientError::Unplaced { .. }
            | ClientError::BadEndpoint { .. }
            | ClientError::BadRequest { .. }
            | ClientError::QueueFull { .. }
    )
}

struct Served {
    runtime: tokio::runtime::Runtime,
    transport: Arc<InProcessTransport>,
    _worker: Arc<ExpertWorker>,
    exact: Vec<f32>,
}

fn served() -> Served {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (transport, worker) = runtime.block_on(support::every_expert_on_a(&model()));
    let table = RoutingTableView::try_from(true_table()).expect("the true table");
    let exact = runtime
        .block_on(call(transport.clone(), table))
        .expect("a call over the true table ends")
        .expect("and succeeds");
    Served { runtime, transport, _worker: worker, exact }
}

/// One layer call over `table`: its output, its error, or `None` if it did not end in time.
async fn call(transport: Arc<InProcessTransport>, table: RoutingTableView) -> Option<Result<Vec<f32>, ClientError>> {
    let (_tables, receiver) = watch::channel(Some(Arc::new(table)));
    // A call whose experts' only holders no worker answers waits this long for a newer table.
    let options = ClientOptions { cpu_threads: 1, timeout: Duration::from_millis(250), ..ClientOptions::default() };
    let client = MoeClient::with_transport(receiver, options, transport);
    let called = tokio::time::timeout(Duration::from_secs(20), client.forward(0, hidden())).await.ok()?;
    Some(called.map(|output| output.hidden))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_changed_table_is_refused_by_version_or_every_call_over_it_ends_by_name(
        changes in proptest::collection::vec(change(), 1..4)
    ) {
        thread_local! { static SERVED: Served = served(); }
        let mut table = true_table();
        changes.iter().for_each(|change| change.apply(&mut table));
        let still_true = still_true(&table);
        let view = match RoutingTableView::try_from(table) {
            Ok(view) => view,
            Err(error) => {
                prop_assert!(!still_true, "the true table was refused: {}", error);
                let named = matches!(&error, ClientError::BadTable { version, reason } if *version == TableVersion(VERSION) && !reason.is_empty());
                prop_assert!(named, "a table is refused by its version: {:?}", error);
                return Ok(());
            }
        };
        SERVED.with(|served| {
            let ended = served.runtime.block_on(call(served.transport.clone(), view));
            let Some(result) = ended else { return Err(TestCaseError::fail("the call did not end")) };
            match result {
                Ok(output) => {
                    prop_assert_eq!(output.len(), TOKENS * WIDTH);
                    prop_assert!(output.iter().all(|value| value.is_finite()), "an output that is not finite");
                    if still_true {
                        prop_assert_eq!(&output, &served.exact, "a table saying the same changed the output");
                    }
                }
                Err(error) => {
                    prop_assert!(!still_true, "a call over a table saying the same failed: {}", error);
                    prop_assert!(names_what_was_wrong(&error), "a call over a changed table failed as {:?}", error);
                }
            }
            Ok(())
        })?;
    }
}
