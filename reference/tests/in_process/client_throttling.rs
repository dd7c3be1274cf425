//! Adaptive throttling over real in-process workers: once a worker has refused most of what it was
//! sent, the client refuses calls to it itself and sends it nothing, failing them as `Throttled`
//! or, with the overflow and next-best policies, letting their assignments overflow or move
//! exactly as the worker's refusal would have.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use switchyard_expert_worker::ExpertWorker;
use switchyard_model::ModelSpec;
use switchyard_proto::v1;
use switchyard_router_client::transport::Answer;
use switchyard_router_client::{
    ClientError, ClientOptions, Endpoint, ExpertTransport, LayerOutput, MoeClient, RefusalPolicy,
};
use tokio::sync::watch;

use crate::support;

const CALLS: usize = 200;

fn model() -> ModelSpec {
    ModelSpec { d_model: 16, d_ff: 32, seed: 11, ..ModelSpec::default_synthetic() }
}

/// Rows that spread over every expert.
fn varied(tokens: usize) -> Vec<f32> {
    (0..tokens * 16).map(|i| ((i as f32 * 12.9898).sin() * 43758.545).fract() * 2.0).collect()
}

/// A client whose even experts are on a worker with room and odd ones on "tiny", whose one-token
/// queues refuse every call.
async fn start(options: ClientOptions) -> (MoeClient, [Arc<ExpertWorker>; 2]) {
    let (transport, table, workers) = support::roomy_and_full(&model()).await;
    let (_tables, receiver) = watch::channel(Some(table));
    (MoeClient::with_transport(receiver, options, transport), workers)
}

#[tokio::test]
async fn a_worker_refusing_everything_is_soon_sent_nothing() {
    let (client, workers) = start(ClientOptions::default()).await;
    let (mut refused_by_worker, mut refused_by_client) = (0, 0);
    for _ in 0..CALLS {
        match client.forward(0, varied(64)).await {
            Err(ClientError::QueueFull { endpoint, .. }) if endpoint == "tiny" => refused_by_worker += 1,
            Err(ClientError::Throttled { endpoint, requests, accepts }) if endpoint == "tiny" => {
                assert_eq!(accepts, 0);
                assert!(requests >= 16, "throttled after {requests} requests");
                refused_by_client += 1;
            }
            other => panic!("every call touches the full worker: {other:?}"),
        }
    }
    // The first 16 refusals are needed to learn; after them the worker sees about one call in
    // `requests + 1`, so a few dozen at most.
    assert!((16..=40).contains(&refused_by_worker), "the worker refused {refused_by_worker} of {CALLS} calls");
    assert_eq!(refused_by_client, CALLS - refused_by_worker);

    let unthrottled = ClientOptions { throttle_ratio: None, ..ClientOptions::default() };
    let (unthrottled, others) = start(unthrottled).await;
    for _ in 0..CALLS {
        let error = unthrottled.forward(0, varied(64)).await.expect_err("the worker is full");
        assert!(matches!(error, ClientError::QueueFull { .. }), "without throttling every call is sent: {error:?}");
    }
    for worker in workers.iter().chain(&others) {
        worker.shutdown().await;
    }
}

#[tokio::test]
async fn with_the_overflow_policy_held_back_rows_overflow_as_refused_ones_do() {
    held_back_rows_go_where_refused_ones_do(RefusalPolicy::Overflow).await;
}

#[tokio::test]
async fn with_the_next_best_policy_held_back_rows_move_as_refused_ones_do() {
    held_back_rows_go_where_refused_ones_do(RefusalPolicy::NextBest).await;
}

/// Held back by the client or refused by the worker, the same choices overflow (or move): every
/// call's output is the same.
async fn held_back_rows_go_where_refused_ones_do(policy: RefusalPolicy) {
    let options = ClientOptions { refusal: policy, ..ClientOptions::default() };
    let (client, workers) = start(options).await;
    let mut outputs = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        outputs.push(client.forward(0, varied(64)).await.expect("refusals overflow instead of failing the call"));
    }
    let sent_to_tiny =
        outputs.iter().filter(|output| output.workers.iter().any(|call| &*call.endpoint == "tiny")).count();
    assert!((16..=40).contains(&sent_to_tiny), "{sent_to_tiny} of {CALLS} calls were sent to the full worker");
    let first = &outputs[0];
    match policy {
        RefusalPolicy::NextBest => assert!(first.routing.rerouted > 0 && first.routing.refused == 0),
        _ => assert!(first.routing.refused > 0 && first.routing.rerouted == 0),
    }
    for output in &outputs {
        assert_eq!((output.routing.refused, output.routing.rerouted), (first.routing.refused, first.routing.rerouted));
        assert_eq!(output.routing.tokens_per_expert, first.routing.tokens_per_expert);
        assert_eq!(output.hidden, first.hidden);
    }
    for worker in &workers {
        worker.shutdown().await;
    }
}

/// With every expert on both workers, the rows throttling holds back from the full one go to the
/// other holder before anything is sent: no call fails, every output equals the first, and the
/// full worker is soon sent nothing.
#[tokio::test]
async fn held_back_rows_of_replicated_experts_go_to_another_holder() {
    let (transport, _, workers) = support::roomy_and_full(&model()).await;
    let (_tables, receiver) = watch::channel(Some(support::table(&model(), 1, |_| vec!["tiny", "a"])));
    let client = MoeClient::with_transport(receiver, ClientOptions::default(), transport);
    let mut outputs = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        outputs.push(client.forward(0, varied(64)).await.expect("the other holder takes the rows"));
    }
    let sent_to_tiny = |outputs: &[LayerOutput]| {
        outputs.iter().filter(|output| output.workers.iter().any(|call| &*call.endpoint == "tiny")).count()
    };
    assert!(sent_to_tiny(&outputs[..16]) == 16, "while throttling learns, the full worker gets its share");
    let late = sent_to_tiny(&outputs[CALLS / 2..]);
    assert!(late <= 10, "{late} of the last {} calls were sent to the full worker", CALLS / 2);
    for output in &outputs {
        assert_eq!((output.routing.refused, output.routing.rerouted), (0, 0));
        assert_eq!(output.hidden, outputs[0].hidden);
    }
    for worker in &workers {
        worker.shutdown().await;
    }
}

/// A call none of whose assignments is computed (held back by the client, whose only holder has
/// refused everything, and let overflow) still returns the call's output: all zeros, each token
/// keeping only its residual path.
#[tokio::test]
async fn a_call_whose_every_assignment_overflows_returns_zeros() {
    let (transport, _, workers) = support::roomy_and_full(&model()).await;
    let (_tables, receiver) = watch::channel(Some(support::table(&model(), 1, |_| vec!["tiny"])));
    let options = ClientOptions { refusal: RefusalPolicy::Overflow, ..ClientOptions::default() };
    let client = MoeClient::with_transport(receiver, options, transport);
    let mut held_back = 0;
    for _ in 0..60 {
        let output = client.forward(0, varied(64)).await.expect("refusals overflow instead of failing the call");
        // Past capacity or refused: none computed.
        if output.routing.refused + output.routing.dropped == 2 * 64 {
            held_back += 1;
            assert_eq!(output.hidden.len(), 64 * 16);
            assert!(output.hidden.iter().all(|value| *value == 0.0));
        }
    }
    assert!(held_back >= 20, "{held_back} of 60 calls had every assignment overflow");
    for worker in &workers {
        worker.shutdown().await;
    }
}

/// A worker that fails every request for a reason other than room.
#[derive(Debug)]
struct Broken;

impl ExpertTransport for Broken {
    fn forward(
        &self,
        endpoint: &Endpoint,
        _request: v1::ForwardRequest,
        _deadline: Duration,
    ) -> BoxFuture<'static, Result<Answer, ClientError>> {
        let error = ClientError::Worker {
            endpoint: endpoint.to_string(),
            code: tonic::Code::Internal,
            message: "broken".into(),
        };
        Box::pin(std::future::ready(Err(error)))
    }
}

/// Throttling counts only refusals for want of room: a worker failing otherwise says nothing of
/// its load, so every call is still sent to it and fails with the worker's own error.
#[tokio::test]
async fn a_worker_failing_for_another_reason_is_never_throttled() {
    let (_tables, receiver) = watch::channel(Some(support::table(&model(), 1, |_| vec!["broken"])));
    let client = MoeClient::with_transport(receiver, ClientOptions::default(), Arc::new(Broken));
    for call in 0..CALLS {
        match client.forward(0, varied(64)).await {
            Err(ClientError::Worker { code: tonic::Code::Internal, .. }) => {}
            other => panic!("call {call} was not sent to the broken worker: {other:?}"),
        }
    }
}
