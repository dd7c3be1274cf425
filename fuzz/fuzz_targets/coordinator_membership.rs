//! What a network peer can send the coordinator about membership: a `RegisterWorker` then a
//! `Heartbeat`, through the gRPC service itself. Each is taken or refused with a status, never a
//! panic; a heartbeat is taken only from the registered id at the current protocol, and only
//! well-formed workers are listed.
//!
//! Input: a little-endian u16 length, that many bytes of `RegisterWorkerRequest`, then the
//! `HeartbeatRequest`. Worker ids carry the coordinator's start time, which no input can guess: a
//! heartbeat naming [`REGISTERED`] is sent with the id the registration was given.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchyard_coordinator::cluster::{Cluster, ClusterConfig};
use switchyard_coordinator::control::{ControlError, ExpertLoad, WorkerControl};
use switchyard_coordinator::metrics::CoordinatorMetrics;
use switchyard_coordinator::service::CoordinatorService;
use switchyard_model::{ExpertId, ModelSpec};
use switchyard_proto::PROTOCOL_VERSION;
use switchyard_proto::v1::{self, coordinator_server::Coordinator};
use tonic::Request;

const REGISTERED: &str = "registered";

/// Workers that load and unload whatever they are told.
struct Obliging;

impl WorkerControl for Obliging {
    async fn load(&self, _endpoint: &str, _load: ExpertLoad<'_>) -> Result<(), ControlError> {
        Ok(())
    }
    async fn unload(&self, _endpoint: &str, _experts: Vec<ExpertId>) -> Result<(), ControlError> {
        Ok(())
    }
    async fn probe(&self, _endpoint: &str) -> Result<(), ControlError> {
        Ok(())
    }
}

fn config() -> ClusterConfig {
    ClusterConfig {
        model: ModelSpec { d_model: 8, d_ff: 16, ..ModelSpec::default_synthetic() },
        heartbeat_interval: Duration::from_millis(10),
        heartbeat_timeout: Duration::from_millis(200),
        min_workers: 1,
        queue_limit_tokens: 64,
        max_batch_tokens: 256,
        unload_grace: Duration::ZERO,
        replicas: 1,
        expert_replicas: Default::default(),
        balancing: None,
    }
}

fuzz_target!(|bytes: &[u8]| {
    let Some((length, rest)) = bytes.split_first_chunk::<2>() else { return };
    let length = usize::from(u16::from_le_bytes(*length)).min(rest.len());
    let (registration, heartbeat) = rest.split_at(length);
    let (Ok(registration), Ok(mut heartbeat)) =
        (v1::RegisterWorkerRequest::decode(registration), v1::HeartbeatRequest::decode(heartbeat))
    else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let cluster = Cluster::new(config(), Obliging, CoordinatorMetrics::default());
        let service = CoordinatorService::new(cluster, stopping);
        let registered = service.register_worker(Request::new(registration.clone())).await.ok();
        if let Some(answer) = registered.as_ref().filter(|_| heartbeat.worker_id == REGISTERED) {
            heartbeat.worker_id = answer.get_ref().worker_id.clone();
        }
        let expected = registered.as_ref().is_some_and(|answer| answer.get_ref().worker_id == heartbeat.worker_id)
            && heartbeat.protocol_version == PROTOCOL_VERSION;
        let beat = service.heartbeat(Request::new(heartbeat.clone())).await;
        assert_eq!(beat.is_ok(), expected, "{registration:?} then {heartbeat:?}: {beat:?}");
        if let Err(status) = beat {
            assert!(!status.message().is_empty(), "{status:?}");
        }
        let status = service.get_cluster_status(Request::new(v1::GetClusterStatusRequest {})).await.expect("status");
        for worker in status.into_inner().workers {
            assert!(!worker.name.chars().any(char::is_control) && !worker.endpoint.is_empty(), "{worker:?}");
        }
    });
});
