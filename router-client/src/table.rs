//! The routing table as the client uses it, and the watcher that keeps it current.
//!
//! [`RoutingTableView`] is the validated domain form of `v1::RoutingTable`. [`TableWatcher`] follows
//! the coordinator's `WatchRoutingTable` stream in the background and reconnects when it breaks; the
//! last table stays in force meanwhile, so a coordinator restart never stops the data path.

use std::sync::Arc;
use std::time::Duration;

use switchyard_model::{ExpertId, ModelSpec, TableVersion};
use switchyard_proto::v1::{self, coordinator_client::CoordinatorClient};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::ClientError;

#[derive(Debug, Clone, PartialEq)]
pub struct RoutingTableView {
    pub version: TableVersion,
    /// The coordinator instance that published it; versions restart with a restarted coordinator.
    pub epoch: u64,
    pub model: ModelSpec,
    /// `endpoints[layer_index * (experts + shared) + expert]`, where `layer_index` is the MoE layer's
    /// position among the model's MoE layers: the workers serving that expert (first is preferred).
    endpoints: Vec<Vec<Arc<str>>>,
    pub queue_limit_tokens: u32,
    /// The largest batch a client may send (the coordinator's `--max-batch-tokens`); 0 if not told.
    pub max_batch_tokens: u32,
}

impl RoutingTableView {
    /// A table that places every expert of `model` on one worker, `endpoint`: the in-process
    /// reference layer's, whose one "worker" holds the whole model.
    pub fn single_worker(model: ModelSpec, endpoint: &str, queue_limit_tokens: u32) -> Self {
        let per_layer = (model.experts_per_layer + model.shared_experts) as usize;
        let endpoints = vec![vec![Arc::from(endpoint)]; model.moe_layers.len() * per_layer];
        Self {
            version: TableVersion(1),
            epoch: 0,
            model,
            endpoints,
            queue_limit_tokens,
            max_batch_tokens: queue_limit_tokens,
        }
    }

    /// The workers serving `expert` of MoE layer `layer`; empty for a layer the model does not have.
    pub fn endpoints(&self, layer: u32, expert: u32) -> &[Arc<str>] {
        let per_layer = self.model.experts_per_layer + self.model.shared_experts;
        match self.model.layer_index(layer) {
            Some(index) => &self.endpoints[index * per_layer as usize + expert as usize],
            None => &[],
        }
    }

    /// True when every expert of every layer has a worker.
    pub fn is_complete(&self) -> bool {
        self.endpoints.iter().all(|endpoints| !endpoints.is_empty())
    }

    /// Experts (routed and shared, of every MoE layer) that have a worker, and how many there are.
    pub fn placed(&self) -> (usize, usize) {
        (self.endpoints.iter().filter(|endpoints| !endpoints.is_empty()).count(), self.endpoints.len())
    }

    /// Whether this table should replace `current`: a newer version of the same coordinator, or
    /// any version of another one (a restarted coordinator counts from 1 again).
    pub fn supersedes(&self, current: Option<&RoutingTableView>) -> bool {
        current.is_none_or(|current| self.epoch != current.epoch || self.version > current.version)
    }

    /// True when some expert has more than one holder.
    pub fn has_replicas(&self) -> bool {
        self.endpoints.iter().any(|endpoints| endpoints.len() > 1)
    }

    /// Every distinct worker endpoint in the table.
    pub fn workers(&self) -> Vec<Arc<str>> {
        let mut workers: Vec<Arc<str>> = self.endpoints.iter().flatten().cloned().collect();
        workers.sort();
        workers.dedup();
        workers
    }
}

impl TryFrom<v1::RoutingTable> for RoutingTableView {
    type Error = ClientError;

    fn try_from(table: v1::RoutingTable) -> Result<Self, Self::Error> {
        let bad = |reason: String| ClientError::BadTable { version: TableVersion(table.version), reason };
        let model = ModelSpec::try_from(table.model.clone()).map_err(|error| bad(error.to_string()))?;
        let experts = (model.experts_per_layer + model.shared_experts) as usize;
        let mut endpoints = vec![Vec::new(); model.moe_layers.len() * experts];
        let mut routed_by: Vec<Option<usize>> = vec![None; endpoints.len()];
        for (index, route) in table.routes.iter().enumerate() {
            let expert = ExpertId::from(route.expert.ok_or_else(|| bad(format!("routes[{index}].expert is missing")))?);
            let Some(layer_index) = model.layer_index(expert.layer).filter(|_| model.contains(&expert)) else {
                return Err(bad(format!("routes[{index}].expert: {expert} is outside the model")));
            };
            let slot = layer_index * experts + expert.expert as usize;
            // Which of two routes holds would be a guess: the coordinator lists each expert once.
            if let Some(first) = routed_by[slot].replace(index) {
                return Err(bad(format!("routes[{index}].expert: {expert} is routed already by routes[{first}]")));
            }
            endpoints[slot] = route.endpoints.iter().map(|endpoint| Arc::from(endpoint.as_str())).collect();
        }
        Ok(Self {
            version: TableVersion(table.version),
            epoch: table.epoch,
            model,
            endpoints,
            queue_limit_tokens: table.queue_limit_tokens,
            max_batch_tokens: table.max_batch_tokens,
        })
    }
}

/// Shared handle to the latest routing table.
pub type TableReceiver = watch::Receiver<Option<Arc<RoutingTableView>>>;

/// Follows the coordinator's table stream until dropped.
#[derive(Debug)]
pub struct TableWatcher {
    coordinator: String,
    receiver: TableReceiver,
    task: JoinHandle<()>,
}

/// Waits between attempts to reach the coordinator: the first, and the longest before jitter.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MOST: Duration = Duration::from_secs(1);

impl TableWatcher {
    /// Starts following `coordinator` (e.g. `http://127.0.0.1:50051`).
    pub fn start(coordinator: &str) -> Result<Self, ClientError> {
        let channel = switchyard_common::transport::channel(coordinator)
            .map_err(|error| ClientError::InvalidInput { field: "coordinator", reason: error.to_string() })?;
        let (sender, receiver) = watch::channel(None);
        let task = tokio::spawn(follow(CoordinatorClient::new(channel), sender, coordinator.to_owned()));
        Ok(Self { coordinator: coordinator.to_owned(), receiver, task })
    }

    pub fn receiver(&self) -> TableReceiver {
        self.receiver.clone()
    }

    pub fn current(&self) -> Option<Arc<RoutingTableView>> {
        self.receiver.borrow().clone()
    }

    /// Waits until a table satisfying `ready` arrives (e.g. [`RoutingTableView::is_complete`]).
    pub async fn wait_for(
        &self,
        ready: impl Fn(&RoutingTableView) -> bool,
        within: Duration,
    ) -> Result<Arc<RoutingTableView>, ClientError> {
        let mut receiver = self.receiver.clone();
        let waited =
            tokio::time::timeout(within, receiver.wait_for(|table| table.as_deref().is_some_and(&ready))).await;
        match waited {
            Ok(Ok(table)) => Ok(table.clone().expect("checked by wait_for")),
            _ => Err(self.not_ready(within)),
        }
    }

    /// Why a wait of `waited` for a table ended without one: none came, or the latest (described).
    fn not_ready(&self, waited: Duration) -> ClientError {
        let coordinator = self.coordinator.clone();
        match self.current() {
            None => ClientError::NoTable { coordinator, waited },
            Some(latest) => {
                let (placed, experts) = latest.placed();
                let workers = latest.workers().len();
                ClientError::TableNotReady { coordinator, waited, version: latest.version, placed, experts, workers }
            }
        }
    }
}

impl Drop for TableWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Follows the coordinator's table for as long as the watcher lives, reconnecting with backoff.
/// Losing the coordinator is warned of once (the client routes on its last table meanwhile) and
/// said again once it is reached, not at every retry.
async fn follow(
    mut client: CoordinatorClient<tonic::transport::Channel>,
    sender: watch::Sender<Option<Arc<RoutingTableView>>>,
    coordinator: String,
) {
    let mut waits = switchyard_common::backoff::reconnect(RECONNECT_FIRST, RECONNECT_MOST);
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    loop {
        let (newer_than, epoch) = sender.borrow().as_ref().map_or((0, 0), |table| (table.version.0, table.epoch));
        match client.watch_routing_table(v1::GetRoutingTableRequest { newer_than, epoch }).await {
            Ok(stream) => {
                if let Some(since) = unreachable_since.take() {
                    let unreachable_ms = since.elapsed().as_millis() as u64;
                    tracing::info!(%coordinator, unreachable_ms, "the coordinator is reached again; following its routing table");
                }
                // Reached: a later loss starts from the shortest wait again.
                waits = switchyard_common::backoff::reconnect(RECONNECT_FIRST, RECONNECT_MOST);
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(table)) => match RoutingTableView::try_from(table) {
                            Ok(view) if view.supersedes(sender.borrow().as_deref()) => {
                                tracing::debug!(version = view.version.0, epoch = view.epoch, "routing table received");
                                sender.send_replace(Some(Arc::new(view)));
                            }
                            Ok(view) => tracing::debug!(version = view.version.0, "ignoring an older routing table"),
                            Err(error) => {
                                tracing::error!(%error, "ignoring a malformed routing table")
                            }
                        },
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(error = status.message(), "routing table stream broke");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                let error = status.message();
                if unreachable_since.is_none() {
                    unreachable_since = Some(tokio::time::Instant::now());
                    match sender.borrow().as_ref().map(|table| table.version.0) {
                        Some(version) => {
                            tracing::warn!(%coordinator, error, version, "coordinator unreachable; routing on the last table meanwhile")
                        }
                        None => tracing::warn!(%coordinator, error, "coordinator unreachable; no routing table yet"),
                    }
                } else {
                    tracing::debug!(%coordinator, error, "coordinator still unreachable")
                }
            }
        }
        tokio::time::sleep(waits.next().unwrap_or(RECONNECT_MOST)).await;
    }
}

#[cfg(test)]
mod tests {
    use switchyard_common::scripted_coordinator::{self, Asked, Script, Watch};

    use super::*;

    fn wire_table() -> v1::RoutingTable {
        let model = ModelSpec { experts_per_layer: 2, ..ModelSpec::default_synthetic() };
        v1::RoutingTable {
            version: 3,
            epoch: 1,
            model: Some(model.to_proto()),
            routes: vec![
                v1::ExpertRoute { expert: Some(v1::ExpertKey::new(0, 1)), endpoints: vec!["http://b".into()] },
                v1::ExpertRoute { expert: Some(v1::ExpertKey::new(0, 0)), endpoints: vec!["http://a".into()] },
            ],
            queue_limit_tokens: 8,
            max_batch_tokens: 64,
        }
    }

    #[test]
    fn layers_are_indexed_by_their_checkpoint_numbers() {
        let model =
            ModelSpec { experts_per_layer: 1, moe_layers: vec![1, 3], top_k: 1, ..ModelSpec::default_synthetic() };
        let table = v1::RoutingTable {
            version: 1,
            epoch: 1,
            model: Some(model.to_proto()),
            routes: vec![
                v1::ExpertRoute { expert: Some(v1::ExpertKey::new(3, 0)), endpoints: vec!["http://b".into()] },
                v1::ExpertRoute { expert: Some(v1::ExpertKey::new(1, 0)), endpoints: vec!["http://a".into()] },
            ],
            queue_limit_tokens: 8,
            max_batch_tokens: 8,
        };
        let view = RoutingTableView::try_from(table.clone()).expect("valid");
        assert_eq!((&*view.endpoints(1, 0)[0], &*view.endpoints(3, 0)[0]), ("http://a", "http://b"));
        assert!(view.endpoints(2, 0).is_empty(), "layer 2 is dense");
        let mut dense = table;
        dense.routes[0].expert = Some(v1::ExpertKey::new(2, 0));
        assert!(RoutingTableView::try_from(dense).unwrap_err().to_string().contains("layer 2 expert 0 is outside"));
    }

    /// Two MoE layers of two routed experts and one shared: every (layer, expert) has its own
    /// holders, the shared expert's after the routed ones; a second holder makes a replica.
    #[test]
    fn each_expert_of_each_layer_has_its_own_holders_shared_ones_included() {
        let model = ModelSpec {
            experts_per_layer: 2,
            shared_experts: 1,
            shared_d_ff: 64,
            moe_layers: vec![0, 1],
            ..ModelSpec::default_synthetic()
        };
        let keys: Vec<(u32, u32)> = (0..2).flat_map(|layer| (0..3).map(move |expert| (layer, expert))).collect();
        let routes = keys
            .iter()
            .map(|(layer, expert)| v1::ExpertRoute {
                expert: Some(v1::ExpertKey::new(*layer, *expert)),
                endpoints: vec![format!("http://w{layer}{expert}")],
            })
            .collect();
        let table = v1::RoutingTable { model: Some(model.to_proto()), routes, ..wire_table() };
        let view = RoutingTableView::try_from(table.clone()).expect("valid");
        for (layer, expert) in &keys {
            assert_eq!(&*view.endpoints(*layer, *expert)[0], format!("http://w{layer}{expert}"));
        }
        assert!(!view.has_replicas());
        let mut replicated = table;
        replicated.routes[4].endpoints.push("http://w00".into());
        assert!(RoutingTableView::try_from(replicated).expect("valid").has_replicas());
        let whole = RoutingTableView::single_worker(model, "http://one", 8);
        assert_eq!(whole.placed(), (6, 6), "the shared experts of both layers too");
        assert_eq!(&*whole.endpoints(1, 2)[0], "http://one");
    }

    #[test]
    fn a_restarted_coordinators_first_table_replaces_a_later_version_of_the_old_one() {
        let old =
            RoutingTableView::try_from(v1::RoutingTable { epoch: 100, version: 7, ..wire_table() }).expect("valid");
        let older =
            RoutingTableView::try_from(v1::RoutingTable { epoch: 100, version: 6, ..wire_table() }).expect("valid");
        let restarted =
            RoutingTableView::try_from(v1::RoutingTable { epoch: 200, version: 1, ..wire_table() }).expect("valid");
        assert!(old.supersedes(None));
        assert!(!older.supersedes(Some(&old)), "an older version of the same coordinator");
        assert!(!old.supersedes(Some(&old)), "the same version again");
        assert!(restarted.supersedes(Some(&old)), "the new coordinator counts from 1");
    }

    #[test]
    fn validates_and_indexes_routes() {
        let view = RoutingTableView::try_from(wire_table()).expect("valid");
        assert_eq!(&*view.endpoints(0, 0)[0], "http://a");
        assert_eq!(&*view.endpoints(0, 1)[0], "http://b");
        assert!(view.is_complete());
        assert_eq!(view.workers().len(), 2);
        let mut outside = wire_table();
        outside.routes[0].expert = Some(v1::ExpertKey::new(0, 5));
        let error = RoutingTableView::try_from(outside).unwrap_err().to_string();
        assert_eq!(
            error,
            "routing table version 3 is malformed: routes[0].expert: layer 0 expert 5 is outside the model"
        );
        let mut partial = wire_table();
        partial.routes[1].endpoints.clear();
        assert!(!RoutingTableView::try_from(partial).expect("valid").is_complete());
        let mut twice = wire_table();
        twice.routes[1].expert = Some(v1::ExpertKey::new(0, 1));
        let error = RoutingTableView::try_from(twice).unwrap_err().to_string();
        assert_eq!(
            error,
            "routing table version 3 is malformed: routes[1].expert: layer 0 expert 1 is routed already by routes[0]"
        );
    }

    /// A watcher of no coordinator whose latest table is `latest`.
    fn watcher_holding(latest: Option<v1::RoutingTable>) -> TableWatcher {
        let latest = latest.map(|table| Arc::new(RoutingTableView::try_from(table).expect("valid")));
        let (_sender, receiver) = watch::channel(latest);
        TableWatcher { coordinator: "http://c".into(), receiver, task: tokio::spawn(async {}) }
    }

    #[tokio::test]
    async fn a_wait_that_ends_without_a_ready_table_says_what_the_latest_placed() {
        let within = Duration::from_millis(10);
        let none = watcher_holding(None).wait_for(RoutingTableView::is_complete, within).await.unwrap_err();
        assert_eq!(none, ClientError::NoTable { coordinator: "http://c".into(), waited: within });

        let mut partial = wire_table();
        partial.routes[1].endpoints.clear();
        let error = watcher_holding(Some(partial)).wait_for(RoutingTableView::is_complete, within).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "no routing table from the coordinator at http://c was ready within 10ms: the latest, version 3, places 1 \
             of 2 experts on 1 worker(s)"
        );
        let complete = watcher_holding(Some(wire_table())).wait_for(RoutingTableView::is_complete, within).await;
        assert_eq!(complete.expect("ready at once").placed(), (2, 2));
    }

    /// An operator reads a lost coordinator once: a warning when it is first unreachable, debug
    /// while it stays so, and a line when it is reached again.
    #[tokio::test]
    async fn losing_the_coordinator_is_said_once_and_its_return_once() {
        use switchyard_common::log_capture::Logged;
        use tracing::Level;

        let (logged, _capturing) = Logged::capture();
        let refused = || Watch::Refused(tonic::Status::unavailable("scripted refusal"));
        let watches = [refused(), refused(), Watch::Streams { items: vec![Ok(wire_table())], open: true }];
        let (coordinator, _requests) =
            scripted_coordinator::serve(Script { watches: watches.into(), ..Script::default() }).await;
        let watcher = TableWatcher::start(&coordinator).expect("a valid address");
        watcher.wait_for(|table| table.version == TableVersion(3), Duration::from_secs(10)).await.expect("the table");
        let said = |level, message| logged.count(level, message);
        assert_eq!(said(Level::WARN, "coordinator unreachable; no routing table yet"), 1, "{:?}", logged.all());
        assert_eq!(said(Level::DEBUG, "coordinator still unreachable"), 1);
        assert_eq!(said(Level::INFO, "the coordinator is reached again; following its routing table"), 1);
        assert_eq!(
            said(Level::WARN, "coordinator unreachable; routing on the last table meanwhile"),
            0,
            "no table yet"
        );
    }

    /// The watcher takes only newer tables (or a restarted coordinator's), ignores malformed ones,
    /// keeps the last table through a broken stream and a refused watch, asks again from the table
    /// it holds, and stops following once dropped.
    #[tokio::test]
    async fn the_watcher_follows_newer_tables_across_broken_streams_until_dropped() {
        let (logged, _capturing) = switchyard_common::log_capture::Logged::capture();
        let table = |epoch, version| v1::RoutingTable { epoch, version, ..wire_table() };
        let mut malformed = table(1, 9);
        malformed.routes[0].expert = None;
        let watches = [
            Watch::Streams {
                items: vec![
                    Ok(table(1, 3)),
                    Ok(table(1, 2)),
                    Ok(malformed),
                    Err(tonic::Status::unavailable("the coordinator went away")),
                ],
                open: false,
            },
            Watch::Refused(tonic::Status::unavailable("scripted refusal")),
            Watch::Streams { items: vec![Ok(table(2, 1))], open: true },
        ];
        let (coordinator, mut requests) =
            scripted_coordinator::serve(Script { watches: watches.into(), ..Script::default() }).await;

        let watcher = TableWatcher::start(&coordinator).expect("a valid address");
        let restarted = watcher
            .wait_for(|table| table.epoch == 2, Duration::from_secs(10))
            .await
            .expect("the restarted coordinator's table");
        assert_eq!(restarted.version, TableVersion(1));
        let mut asked = Vec::new();
        while let Ok(Asked::Watch { newer_than, epoch }) = requests.try_recv() {
            asked.push((newer_than, epoch));
        }
        // Version 3 was held through the broken stream and the refusal: neither the older
        // version 2 nor the malformed version 9 replaced it.
        assert_eq!(asked, [(0, 0), (3, 1), (3, 1)]);
        let warned = logged.count(tracing::Level::WARN, "coordinator unreachable; routing on the last table meanwhile");
        assert_eq!(warned, 1, "the refusal, with version 3 held: {:?}", logged.all());

        let mut receiver = watcher.receiver();
        receiver.borrow_and_update();
        drop(watcher);
        let stopped = tokio::time::timeout(Duration::from_secs(5), receiver.changed()).await;
        assert!(matches!(stopped, Ok(Err(_))), "the following task ends with its watcher: {stopped:?}");
        assert_eq!(receiver.borrow().as_deref().map(|table| table.epoch), Some(2), "the last table stays readable");
    }
}
