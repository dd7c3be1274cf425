//! Joining the cluster: register with the coordinator, then heartbeat. A coordinator that answers a
//! heartbeat with NOT_FOUND has lost its state (it restarted): the worker registers again, listing
//! the experts it still holds. While the coordinator is unreachable the worker keeps serving.
//! Leaving it: [`drain`] asks the coordinator to move this worker's experts away first.

use std::sync::Arc;
use std::time::Duration;

use switchyard_model::WeightDtype;
use switchyard_proto::PROTOCOL_VERSION;
use switchyard_proto::v1::{self, coordinator_client::CoordinatorClient};
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
        let (worker_id, interval) = register(&mut client, &worker, &membership).await;
        registered.send_replace(Some(worker_id.clone()));
        readiness.set_not_ready("registered; waiting for the coordinator to place experts");
        heartbeat_until_forgotten(&mut client, &worker, &worker_id, interval, &readiness).await;
        tracing::warn!(%worker_id, "coordinator forgot this worker; registering again");
        readiness.set_not_ready("registering with the coordinator again");
    }
}

async fn register(
    client: &mut CoordinatorClient<Channel>,
    worker: &ExpertWorker,
    membership: &Membership,
) -> (String, Duration) {
    let mut waits = switchyard_common::backoff::reconnect(RETRY_FIRST, RETRY_MOST);
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
                tracing::info!(worker_id = %response.worker_id, interval_ms = interval.as_millis() as u64, "registered with the coordinator");
                return (response.worker_id, interval);
            }
            Err(status) => {
                let (coordinator, error) = (&membership.coordinator_uri, status.message());
                let wait = waits.next().unwrap_or(RETRY_MOST);
                let retry_in_ms = wait.as_millis() as u64;
                if status.code() == Code::FailedPrecondition {
                    tracing::error!(%coordinator, error, retry_in_ms, "coordinator refused registration; retrying");
                } else {
                    tracing::warn!(%coordinator, error, retry_in_ms, "coordinator unreachable; retrying");
                }
                tokio::time::sleep(wait).await;
            }
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
