//! Joining the cluster: register with the coordinator, then heartbeat. A coordinator that answers a
//! heartbeat with NOT_FOUND has lost its state (it restarted): the worker registers again, listing
//! the experts it still holds. While the coordinator is unreachable the worker keeps serving.
//! Leaving it: [`drain`] asks the coordinator to move this worker's experts away first.

use std::sync::Arc;
use std::time::Duration;

use switchyard_model::WeightDtype;
use switchyard_proto::v1::{self, coordinator_client::CoordinatorClient};
use switchyard_proto::{PROTOCOL_VERSION, status};
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;

use crate::worker::ExpertWorker;
use switchyard_common::readiness::Readiness;

/// How this worker presents itself to the coordinator.
#[derive(Debug, Clone)]
pub struct Membership {
    pub coordinator_uri: String,
    pub name: String,
    /// The endpoint clients and the coordinator dial.
    pub endpoint: String,
    pub device: String,
    pub memory_bytes: u64,
    /// `--dtype`, so the coordinator counts what the memory holds in the right element size.
    pub dtype: Option<WeightDtype>,
    /// Matrix-multiply rate in GFLOP/s, for placement to weigh this worker's share by.
    pub compute_gflops: f64,
}

/// Waits between registration attempts: the first, and the longest before jitter.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MOST: Duration = Duration::from_secs(2);

/// Registers and heartbeats until the task is aborted; `registered` holds the id the coordinator
/// knows this worker by, `readiness` whether the experts it placed here are loaded.
pub async fn run(
    worker: Arc<ExpertWorker>,
    membership: Membership,
    registered: watch::Sender<Option<String>>,
    readiness: Readiness,
) {
    let channel = match switchyard_common::transport::channel(&membership.coordinator_uri) {
        Ok(channel) => channel,
        Err(error) => {
            tracing::error!(%error, uri = %membership.coordinator_uri, "bad coordinator address; not joining");
            return;
        }
    };
    let mut client = CoordinatorClient::new(channel);
    loop {
        let (worker_id, interval) = register(&mut client, &worker, &membership, &readiness).await;
        registered.send_replace(Some(worker_id.clone()));
        readiness.set_not_ready("registered; waiting for the coordinator to place experts");
        heartbeat_until_forgotten(&mut client, &worker, &worker_id, interval, &readiness).await;
        tracing::warn!(%worker_id, "coordinator forgot this worker; registering again");
        readiness.set_not_ready("registering with the coordinator again");
    }
}

/// Registers until the coordinator takes this worker; while it does not, `readiness` says why (what
/// `/readyz` answers an operator). Each new reason is logged at its level, a repeat of the last at
/// debug: a long outage or a standing refusal is not a line every retry.
async fn register(
    client: &mut CoordinatorClient<Channel>,
    worker: &ExpertWorker,
    membership: &Membership,
    readiness: &Readiness,
) -> (String, Duration) {
    let mut waits = switchyard_common::backoff::reconnect(RETRY_FIRST, RETRY_MOST);
    let coordinator = &membership.coordinator_uri;
    let (mut failed_attempts, mut last_reason) = (0u32, None::<String>);
    loop {
        let request = v1::RegisterWorkerRequest {
            protocol_version: PROTOCOL_VERSION,
            name: membership.name.clone(),
            endpoint: membership.endpoint.clone(),
            device: membership.device.clone(),
            memory_bytes: membership.memory_bytes,
            weight_dtype: membership.dtype.map_or(v1::Dtype::Unspecified, WeightDtype::to_proto) as i32,
            loaded_experts: worker.resident_experts().into_iter().map(Into::into).collect(),
            compute_gflops: membership.compute_gflops,
        };
        match client.register_worker(request).await {
            Ok(response) => {
                let response = response.into_inner();
                let interval = Duration::from_millis(u64::from(response.heartbeat_interval_ms.max(50)));
                tracing::info!(worker_id = %response.worker_id, interval_ms = interval.as_millis() as u64, failed_attempts, "registered with the coordinator");
                return (response.worker_id, interval);
            }
            Err(status) => {
                failed_attempts += 1;
                let wait = waits.next().unwrap_or(RETRY_MOST);
                let (error, retry_in_ms) = (status.message(), wait.as_millis() as u64);
                let not_taken = NotTaken::of(&status);
                let reason = not_taken.reason(coordinator, error);
                if last_reason.as_ref() == Some(&reason) {
                    tracing::debug!(%coordinator, error, retry_in_ms, failed_attempts, "registration failed again; retrying");
                } else {
                    match not_taken {
                        NotTaken::Unreachable => {
                            tracing::warn!(%coordinator, error, retry_in_ms, "coordinator unreachable; retrying")
                        }
                        NotTaken::Full { limit } => {
                            tracing::warn!(%coordinator, error, limit, retry_in_ms, "coordinator has its most workers; retrying")
                        }
                        NotTaken::Refused => {
                            tracing::error!(%coordinator, error, retry_in_ms, "coordinator refused registration; retrying")
                        }
                    }
                }
                readiness.set_not_ready(reason.clone());
                last_reason = Some(reason);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Why the coordinator did not take a registration.
enum NotTaken {
    Unreachable,
    /// At its --max-workers (`limit`, when the refusal carries it): taken once another worker leaves.
    Full {
        limit: Option<u64>,
    },
    Refused,
}

impl NotTaken {
    fn of(status: &tonic::Status) -> Self {
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => NotTaken::Unreachable,
            Code::ResourceExhausted => {
                NotTaken::Full { limit: status::WorkerLimit::from_status(status).map(|refusal| refusal.limit) }
            }
            _ => NotTaken::Refused,
        }
    }

    /// What readiness says meanwhile.
    fn reason(&self, coordinator: &str, error: &str) -> String {
        match self {
            NotTaken::Unreachable => format!("the coordinator at {coordinator} is unreachable ({error}); retrying"),
            NotTaken::Full { limit: Some(limit) } => {
                format!(
                    "the coordinator has its most workers ({limit}, its --max-workers); registering once one leaves"
                )
            }
            NotTaken::Full { limit: None } => format!("the coordinator has its most workers ({error}); retrying"),
            NotTaken::Refused => format!("the coordinator refused registration: {error}; retrying"),
        }
    }
}

async fn heartbeat_until_forgotten(
    client: &mut CoordinatorClient<Channel>,
    worker: &ExpertWorker,
    worker_id: &str,
    interval: Duration,
    readiness: &Readiness,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Said once when heartbeats start failing and once when they are answered again, not each tick.
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        ticker.tick().await;
        let request = v1::HeartbeatRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: worker_id.to_owned(),
            queued_tokens: worker.queued_tokens() as u64,
            tokens_served: worker.tokens_served(),
            experts: crate::service::expert_stats(worker),
        };
        match client.heartbeat(request).await {
            Ok(reply) => {
                if let Some(since) = failing_since.take() {
                    let failed_for_ms = since.elapsed().as_millis() as u64;
                    tracing::info!(%worker_id, failed_for_ms, "the coordinator answers heartbeats again");
                }
                follow_placement(readiness, reply.get_ref());
            }
            Err(status) if status.code() == Code::NotFound => return,
            // Once stopping, a coordinator that is gone too (a whole cluster taken down) is no
            // news for the operator.
            Err(status) if failing_since.is_some() || readiness.is_stopping() => {
                tracing::debug!(error = status.message(), "heartbeat failed; still serving")
            }
            Err(status) => {
                failing_since = Some(tokio::time::Instant::now());
                tracing::warn!(%worker_id, error = status.message(), "heartbeats to the coordinator fail; serving on the last placement meanwhile");
            }
        }
    }
}

/// Ready once the coordinator placed experts and this worker holds every one placed on it.
fn follow_placement(readiness: &Readiness, reply: &v1::HeartbeatResponse) {
    match (reply.placed, reply.experts_to_load) {
        (false, _) => readiness.set_not_ready("waiting for the coordinator's first placement (--min-workers)"),
        (true, 0) => readiness.set_ready(),
        (true, missing) => readiness.set_not_ready(format!("{missing} experts placed here are still loading")),
    }
}

/// How a stopping worker leaves.
#[derive(Debug, Clone, Copy)]
pub struct DrainPolicy {
    /// The longest wait for the coordinator to move the experts away.
    pub timeout: Duration,
    /// Serving on after the last route went, for calls planned on an earlier table.
    pub settle: Duration,
}

const DRAIN_POLL: Duration = Duration::from_millis(100);

/// Asks the coordinator to move this worker's experts elsewhere and waits until no route names
/// it (or `policy.timeout` passes), then `policy.settle` more; the worker serves throughout.
pub async fn drain(coordinator_uri: &str, registered: &watch::Receiver<Option<String>>, policy: DrainPolicy) {
    let Some(worker_id) = registered.borrow().clone() else {
        tracing::info!("never registered: nothing to drain");
        return;
    };
    let mut client = match switchyard_common::transport::channel(coordinator_uri) {
        Ok(channel) => CoordinatorClient::new(channel),
        Err(error) => {
            tracing::warn!(%error, "bad coordinator address; stopping without draining");
            return;
        }
    };
    let started = tokio::time::Instant::now();
    loop {
        let request = v1::DrainWorkerRequest { protocol_version: PROTOCOL_VERSION, worker_id: worker_id.clone() };
        match client.drain_worker(request).await {
            Ok(response) if response.get_ref().routed_experts == 0 => {
                tracing::info!(%worker_id, table_version = response.get_ref().table_version, "no route names this worker any more");
                break;
            }
            Ok(response) => {
                tracing::debug!(routed = response.get_ref().routed_experts, "waiting for the experts to move")
            }
            Err(status) if status.code() == Code::NotFound => {
                tracing::info!("the coordinator no longer knows this worker: nothing routes to it");
                break;
            }
            Err(status) if status.code() == Code::Unavailable => {
                tracing::info!(error = status.message(), "no coordinator to drain through; stopping");
                return;
            }
            Err(status) => tracing::warn!(error = status.message(), "drain request failed; retrying"),
        }
        if started.elapsed() >= policy.timeout {
            tracing::warn!(
                timeout_ms = policy.timeout.as_millis() as u64,
                "experts not moved in time; stopping anyway"
            );
            return;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    tokio::time::sleep(policy.settle).await;
}

#[cfg(test)]
mod tests {
    use switchyard_common::log_capture::Logged;
    use switchyard_common::scripted_coordinator::{Asked, Script, serve};
    use tokio::sync::mpsc;

    use super::*;
    use crate::metrics::WorkerMetrics;
    use crate::worker::WorkerOptions;

    async fn next_asked(requests: &mut mpsc::UnboundedReceiver<Asked>) -> Asked {
        tokio::time::timeout(Duration::from_secs(10), requests.recv())
            .await
            .expect("the worker asks in time")
            .expect("the coordinator is serving")
    }

    fn membership(coordinator_uri: String) -> Membership {
        Membership {
            coordinator_uri,
            name: "worker-a".into(),
            endpoint: "http://127.0.0.1:1".into(),
            device: "cpu".into(),
            memory_bytes: 1 << 30,
            dtype: None,
            compute_gflops: 1.0,
        }
    }

    /// A worker joining the scripted coordinator: the membership task, the worker, what the
    /// coordinator is asked, and the id the worker registered as.
    struct Joining {
        task: tokio::task::JoinHandle<()>,
        worker: Arc<ExpertWorker>,
        requests: mpsc::UnboundedReceiver<Asked>,
        registered_as: watch::Receiver<Option<String>>,
    }

    async fn join(script: Script, readiness: Readiness) -> Joining {
        let (coordinator, requests) = serve(script).await;
        let worker = ExpertWorker::start(WorkerOptions::in_process(tch::Device::Cpu), WorkerMetrics::new())
            .expect("the compute thread starts");
        let (registered, registered_as) = watch::channel(None);
        let task = tokio::spawn(run(worker.clone(), membership(coordinator), registered, readiness));
        Joining { task, worker, requests, registered_as }
    }

    impl Joining {
        async fn heartbeats(&mut self, count: usize) {
            let mut heartbeats = 0;
            while heartbeats < count {
                if let Asked::Heartbeat { .. } = next_asked(&mut self.requests).await {
                    heartbeats += 1;
                }
            }
        }

        async fn leave(self) {
            self.task.abort();
            self.worker.shutdown().await;
        }
    }

    fn heartbeat(placed: bool, experts_to_load: u32) -> v1::HeartbeatResponse {
        v1::HeartbeatResponse { placed, experts_to_load, ..Default::default() }
    }

    #[test]
    fn readiness_follows_the_coordinator_s_placement() {
        let readiness = Readiness::not_ready("starting");
        follow_placement(&readiness, &heartbeat(false, 0));
        assert!(readiness.not_ready_because().is_some_and(|reason| reason.contains("first placement")));
        follow_placement(&readiness, &heartbeat(true, 3));
        assert_eq!(readiness.not_ready_because().as_deref(), Some("3 experts placed here are still loading"));
        follow_placement(&readiness, &heartbeat(true, 0));
        assert_eq!(readiness.not_ready_because(), None);
    }

    /// A refused registration is retried; a failed heartbeat is followed by the next one, and one
    /// answered NOT_FOUND (a restarted coordinator) makes the worker register again; heartbeats
    /// meanwhile keep readiness in step.
    #[tokio::test]
    async fn the_worker_registers_until_taken_and_again_once_forgotten() {
        let script = Script {
            registrations: [Err(tonic::Status::unavailable("starting"))].into(),
            heartbeats: [
                Ok(heartbeat(true, 2)),
                Err(tonic::Status::unavailable("restarting")),
                Err(tonic::Status::not_found("unknown worker w-1")),
            ]
            .into(),
            ..Script::default()
        };
        let readiness = Readiness::not_ready("starting");
        let mut joining = join(script, readiness.clone()).await;
        let (requests, registered_as) = (&mut joining.requests, &mut joining.registered_as);

        let register = Asked::Register { name: "worker-a".into(), endpoint: "http://127.0.0.1:1".into() };
        let heartbeat = Asked::Heartbeat { worker_id: "w-1".into() };
        assert_eq!(next_asked(requests).await, register, "refused");
        assert_eq!(next_asked(requests).await, register, "retried");
        registered_as.wait_for(Option::is_some).await.expect("the membership task runs");
        assert_eq!(registered_as.borrow().as_deref(), Some("w-1"));
        assert_eq!(next_asked(requests).await, heartbeat);
        assert_eq!(next_asked(requests).await, heartbeat, "failed: serves on and beats again");
        assert_eq!(next_asked(requests).await, heartbeat, "answered NOT_FOUND");
        assert_eq!(next_asked(requests).await, register, "forgotten: registers again");
        assert_eq!(next_asked(requests).await, heartbeat);
        let ready = async {
            while readiness.not_ready_because().is_some() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), ready).await.expect("ready once every placed expert is held");
        joining.leave().await;
    }

    /// While the coordinator will not take the worker, readiness (what `/readyz` answers) says
    /// why: full, unreachable, or refused, each in turn.
    #[tokio::test]
    async fn readiness_says_why_the_coordinator_does_not_take_the_worker() {
        let full = status::WorkerLimit { limit: 2 }.into_status("registration refused");
        let script = Script {
            registrations: [
                Err(full),
                Err(tonic::Status::unavailable("restarting")),
                Err(tonic::Status::failed_precondition("protocol_version: worker speaks 0")),
            ]
            .into(),
            ..Script::default()
        };
        let readiness = Readiness::not_ready("starting");
        let joining = join(script, readiness.clone()).await;
        let mut reasons: Vec<String> = Vec::new();
        let registered = async {
            while joining.registered_as.borrow().is_none() {
                if let Some(reason) = readiness.not_ready_because()
                    && reasons.last() != Some(&reason)
                {
                    reasons.push(reason);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), registered).await.expect("registered once the script ran out");
        let said = |part: &str| reasons.iter().position(|reason| reason.contains(part));
        let full = said("the coordinator has its most workers (2, its --max-workers)");
        let unreachable = said("is unreachable (restarting)");
        let refused = said("the coordinator refused registration: protocol_version: worker speaks 0");
        assert!(full.is_some() && unreachable.is_some() && refused.is_some(), "{reasons:#?}");
        assert!(full < unreachable && unreachable < refused, "in the order it was answered: {reasons:#?}");
        joining.leave().await;
    }

    /// The warning that heartbeats fail, as the membership task logs it.
    const HEARTBEATS_FAILING: &str = "heartbeats to the coordinator fail; serving on the last placement meanwhile";

    /// An operator reads a refused registration as an error (once while it stays the same) and an
    /// unreachable coordinator as a warning; heartbeats that keep failing are warned of once, then
    /// at debug level until one is answered again, which is said once.
    #[tokio::test]
    async fn failing_registrations_and_heartbeats_are_said_once_at_their_level() {
        use tracing::Level;

        let (logged, _capturing) = Logged::capture();
        let unavailable = || tonic::Status::unavailable("restarting");
        let script = Script {
            registrations: [
                Err(tonic::Status::failed_precondition("protocol 0")),
                Err(tonic::Status::failed_precondition("protocol 0")),
                Err(unavailable()),
            ]
            .into(),
            heartbeats: [Err(unavailable()), Err(unavailable()), Err(unavailable()), Ok(heartbeat(true, 0))].into(),
            ..Script::default()
        };
        let mut joining = join(script, Readiness::not_ready("starting")).await;
        joining.heartbeats(5).await;
        joining.leave().await;

        assert_eq!(logged.count(Level::ERROR, "coordinator refused registration; retrying"), 1);
        assert_eq!(logged.count(Level::DEBUG, "registration failed again; retrying"), 1, "the same refusal again");
        assert_eq!(logged.count(Level::WARN, "coordinator unreachable; retrying"), 1);
        assert_eq!(logged.count(Level::WARN, HEARTBEATS_FAILING), 1, "{:?}", logged.all());
        assert_eq!(logged.count(Level::DEBUG, "heartbeat failed; still serving"), 2);
        assert_eq!(logged.count(Level::INFO, "the coordinator answers heartbeats again"), 1);
    }

    /// A stopping worker whose coordinator is gone too says so only at debug level.
    #[tokio::test]
    async fn a_stopping_worker_s_failing_heartbeats_are_not_warned_of() {
        use tracing::Level;

        let (logged, _capturing) = Logged::capture();
        let unavailable = || Err(tonic::Status::unavailable("the cluster is going down"));
        let script = Script { heartbeats: [unavailable(), unavailable()].into(), ..Script::default() };
        let readiness = Readiness::not_ready("starting");
        readiness.stopping("shutting down");
        let mut joining = join(script, readiness).await;
        joining.heartbeats(3).await;
        joining.leave().await;

        assert_eq!(logged.count(Level::DEBUG, "heartbeat failed; still serving"), 2);
        assert_eq!(logged.count(Level::WARN, HEARTBEATS_FAILING), 0);
    }

    fn registered(worker_id: Option<&str>) -> watch::Receiver<Option<String>> {
        watch::channel(worker_id.map(str::to_owned)).1
    }

    #[tokio::test]
    async fn a_drain_waits_until_no_route_names_the_worker_then_settles() {
        let routed = |experts| Ok(v1::DrainWorkerResponse { routed_experts: experts, ..Default::default() });
        let script = Script { drains: [routed(3), routed(1)].into(), ..Script::default() };
        let (coordinator, mut requests) = serve(script).await;
        let settle = Duration::from_millis(300);
        let policy = DrainPolicy { timeout: Duration::from_secs(30), settle };
        let started = tokio::time::Instant::now();
        drain(&coordinator, &registered(Some("w-1")), policy).await;
        assert!(started.elapsed() >= settle, "serves on for the settle time after the last route went");
        for _ in 0..3 {
            assert_eq!(next_asked(&mut requests).await, Asked::Drain { worker_id: "w-1".into() });
        }
        assert!(requests.try_recv().is_err(), "no drain request after the routes went");
    }

    #[tokio::test]
    async fn a_drain_the_coordinator_cannot_serve_ends_without_settling() {
        let long = DrainPolicy { timeout: Duration::from_secs(30), settle: Duration::from_secs(30) };
        let script = Script { drains: [Err(tonic::Status::unavailable("no leader"))].into(), ..Script::default() };
        let (coordinator, mut requests) = serve(script).await;
        tokio::time::timeout(Duration::from_secs(10), drain(&coordinator, &registered(Some("w-1")), long))
            .await
            .expect("no coordinator to drain through: stops at once");
        assert_eq!(next_asked(&mut requests).await, Asked::Drain { worker_id: "w-1".into() });

        let script = Script { drains: [Err(tonic::Status::not_found("unknown worker"))].into(), ..Script::default() };
        let (coordinator, mut requests) = serve(script).await;
        let short_settle = DrainPolicy { timeout: Duration::from_secs(30), settle: Duration::from_millis(200) };
        let started = tokio::time::Instant::now();
        drain(&coordinator, &registered(Some("w-1")), short_settle).await;
        assert!(started.elapsed() >= short_settle.settle, "a forgotten worker is routed to no more, but settles");
        assert_eq!(next_asked(&mut requests).await, Asked::Drain { worker_id: "w-1".into() });
        assert!(requests.try_recv().is_err(), "asked once");

        let (coordinator, mut requests) = serve(Script::default()).await;
        tokio::time::timeout(Duration::from_secs(10), drain(&coordinator, &registered(None), long))
            .await
            .expect("never registered: nothing to drain");
        assert!(requests.try_recv().is_err(), "nothing asked");
    }

    #[tokio::test]
    async fn a_failed_drain_request_is_asked_again() {
        let script = Script { drains: [Err(tonic::Status::internal("a bug"))].into(), ..Script::default() };
        let (coordinator, mut requests) = serve(script).await;
        let policy = DrainPolicy { timeout: Duration::from_secs(30), settle: Duration::ZERO };
        tokio::time::timeout(Duration::from_secs(10), drain(&coordinator, &registered(Some("w-1")), policy))
            .await
            .expect("the second request finds no route left");
        for _ in 0..2 {
            assert_eq!(next_asked(&mut requests).await, Asked::Drain { worker_id: "w-1".into() });
        }
    }

    #[tokio::test]
    async fn a_drain_that_takes_too_long_stops_without_settling() {
        let routed = Ok(v1::DrainWorkerResponse { routed_experts: 2, ..Default::default() });
        let script = Script { drains: std::iter::repeat_n(routed, 100).collect(), ..Script::default() };
        let (coordinator, mut requests) = serve(script).await;
        let policy = DrainPolicy { timeout: Duration::from_millis(450), settle: Duration::from_secs(30) };
        tokio::time::timeout(Duration::from_secs(10), drain(&coordinator, &registered(Some("w-1")), policy))
            .await
            .expect("gives up after its timeout");
        let mut asked = 0;
        while requests.try_recv().is_ok() {
            asked += 1;
        }
        assert!((2..=8).contains(&asked), "polled every {DRAIN_POLL:?} until the timeout: {asked} requests");
    }
}
