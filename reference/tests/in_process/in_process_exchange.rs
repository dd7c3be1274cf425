//! The client's exchange over the in-process transport, with real workers and no processes: a
//! destination that refuses ends the call at once, typed, while another is still computing.

use std::sync::Arc;
use std::time::Duration;

use switchyard_expert_worker::{ExpertWorker, ExpertWorkerService};
use switchyard_model::{ExpertId, ModelSpec};
use switchyard_proto::v1;
use switchyard_proto::wire::{self, WireDtype};
use switchyard_reference::in_process::InProcessTransport;
use switchyard_router_client::ClientError;
use switchyard_router_client::dispatch::PlannedRequest;
use switchyard_router_client::exchange::{self, Outcome};
use switchyard_router_client::replicas::Replicas;

use crate::support;

fn model() -> ModelSpec {
    ModelSpec { d_model: 8, d_ff: 16, experts_per_layer: 4, ..ModelSpec::default_synthetic() }
}

/// A worker holding `expert` behind a queue of `limit` tokens, whose batcher holds queued rows up to
/// `batch_wait` while another request is on its way in.
async fn worker(expert: u32, limit: usize, batch_wait: Duration) -> Arc<ExpertWorker> {
    support::cpu_worker(model(), vec![ExpertId::new(0, expert)], limit, batch_wait).await
}

fn request(endpoint: &str, expert: u32, rows: usize) -> PlannedRequest {
    let values: Vec<f32> = (0..rows * 8).map(|i| (i as f32 * 0.1).sin()).collect();
    PlannedRequest {
        endpoint: Arc::from(endpoint),
        request: v1::ForwardRequest {
            request_id: 7,
            batches: vec![v1::ExpertRows {
                expert: Some(v1::ExpertKey::new(0, expert)),
                rows: Some(v1::WireTensor {
                    dtype: v1::Dtype::F32 as i32,
                    shape: vec![rows as u64, 8],
                    data: wire::encode_f32(&values, WireDtype::F32),
                }),
            }],
            output_dtype: 0,
            tokens: None,
            sequence: 0,
        },
        pieces: Vec::new(),
        token_major: None,
        stream: 0,
    }
}

#[tokio::test]
async fn a_refusal_ends_the_exchange_while_the_slow_worker_still_holds_its_rows() {
    // "slow" holds its rows for an hour, waiting to merge them with a request announced as on its
    // way in that never comes (without one, its batcher computes at once, and the call could be
    // answered before the refusal ends it); "full" admits one token and is sent two.
    let slow = worker(0, 1024, Duration::from_secs(3600)).await;
    let _never_arrives = slow.announce();
    let full = worker(1, 1, Duration::ZERO).await;
    let transport = InProcessTransport::new([
        (Arc::from("slow"), ExpertWorkerService::new(slow.clone(), "slow")),
        (Arc::from("full"), ExpertWorkerService::new(full.clone(), "full")),
    ]);
    let requests = [request("slow", 0, 3), request("full", 1, 2)];
    let replicas = Replicas::default();
    let exchanged =
        exchange::run(&transport, &replicas, &requests, Duration::from_secs(7200), |_| false, |_, _| Ok(()));
    // A guard against hanging for the slow worker's hour, not a measurement.
    let failure = tokio::time::timeout(Duration::from_secs(60), exchanged)
        .await
        .expect("the exchange returned without waiting for the slow worker")
        .unwrap_err();
    assert_eq!(
        failure.error,
        ClientError::QueueFull {
            endpoint: "full".into(),
            expert: ExpertId::new(0, 1),
            queued: 0,
            limit: 1,
            requested: 2
        }
    );
    let outcomes: Vec<(&str, bool)> = failure
        .outcomes
        .iter()
        .map(|destination| (&*destination.endpoint, matches!(destination.outcome, Outcome::Abandoned)))
        .collect();
    assert_eq!(outcomes, [("slow", true), ("full", false)]);
    assert!(matches!(failure.outcomes[1].outcome, Outcome::Failed(ClientError::QueueFull { .. })));
    slow.shutdown().await;
    full.shutdown().await;
}

#[tokio::test]
async fn a_malformed_field_comes_back_as_a_bad_request_naming_it() {
    let served = worker(2, 1024, Duration::ZERO).await;
    let transport = InProcessTransport::new([(Arc::from("w"), ExpertWorkerService::new(served.clone(), "w"))]);
    let mut truncated = request("w", 2, 2);
    if let Some(rows) = truncated.request.batches[0].rows.as_mut() {
        rows.data = rows.data.slice(..10);
    }
    let failure = exchange::run(
        &transport,
        &Replicas::default(),
        &[truncated],
        Duration::from_secs(30),
        |_| false,
        |_, _| Ok(()),
    )
    .await
    .unwrap_err();
    match failure.error {
        ClientError::BadRequest { endpoint, field, description } => {
            assert_eq!((endpoint.as_str(), field.as_str()), ("w", "batches[0].rows.data"));
            assert!(description.contains("needs 64 bytes, got 10"), "{description}");
        }
        other => panic!("expected a BadRequest, got {other:?}"),
    }
    served.shutdown().await;
}
