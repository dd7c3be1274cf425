//! Joining the cluster: register with the coordinator, then heartbeat. A coordinator that answers a
//! heartbeat with NOT_FOUND has lost its state (it restarted): the worker registers again, listing
//! the experts it still holds. While the coordinator is unreachable the worker keeps serving.

use std::sync::Arc;
use std::time::Duration;

use switchyard_model::WeightDtype;
use switchyard_proto::PROTOCOL_VERSION;
use switchyard_proto::v1::{self, coordinator_client::CoordinatorClient};
use tonic::Code;
use tonic::transport::Channel;

use crate::worker::ExpertWorker;

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
}

const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Registers and heartbeats until the task is aborted.
pub async fn run(worker: Arc<ExpertWorker>, membership: Membership) {
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
        heartbeat_until_forgotten(&mut client, &worker, &worker_id, interval).await;
        tracing::warn!(%worker_id, "coordinator forgot this worker; registering again");
    }
}

async fn register(
    client: &mut CoordinatorClient<Channel>,
    worker: &ExpertWorker,
    membership: &Membership,
) -> (String, Duration) {
    loop {
        let request = v1::RegisterWorkerRequest {
            protocol_version: PROTOCOL_VERSION,
            name: membership.name.clone(),
            endpoint: membership.endpoint.clone(),
            device: membership.device.clone(),
            memory_bytes: membership.memory_bytes,
            weight_dtype: membership.dtype.map_or(v1::Dtype::Unspecified, WeightDtype::to_proto) as i32,
            loaded_experts: worker.resident_experts().into_iter().map(Into::into).collect(),
        };
        match client.register_worker(request).await {
            Ok(response) => {
                let response = response.into_inner();
                let interval = Duration::from_millis(u64::from(response.heartbeat_interval_ms.max(50)));
                tracing::info!(worker_id = %response.worker_id, ?interval, "registered with the coordinator");
                return (response.worker_id, interval);
            }
            Err(status) if status.code() == Code::FailedPrecondition => {
                tracing::error!(message = status.message(), "coordinator refused registration; retrying");
            }
            Err(status) => tracing::warn!(message = status.message(), "coordinator unreachable; retrying"),
        }
        tokio::time::sleep(RETRY_DELAY).await;
    }
}

async fn heartbeat_until_forgotten(
    client: &mut CoordinatorClient<Channel>,
    worker: &ExpertWorker,
    worker_id: &str,
    interval: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let request = v1::HeartbeatRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: worker_id.to_owned(),
            queued_tokens: worker.queued_tokens() as u64,
            tokens_served: worker.tokens_served(),
        };
        match client.heartbeat(request).await {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => return,
            Err(status) => tracing::debug!(message = status.message(), "heartbeat failed; still serving"),
        }
    }
}
