//! What a layer call books besides its output, over real in-process workers: each worker's
//! requests, rows and bytes both ways, the straggler's time split into its phases, and request ids
//! that no other client process uses; a call past the cluster's largest batch refused unsent.

use std::sync::Arc;
use std::time::Duration;

use support::MessageBytes;
use switchyard_expert_worker::{ExpertWorker, ExpertWorkerService};
use switchyard_model::{ExpertId, ModelSpec};
use switchyard_reference::in_process::InProcessTransport;
use switchyard_router_client::{ClientError, ClientOptions, DispatchLayout, LayerOutput, MoeClient};
use tokio::sync::watch;

use crate::support;

const D_MODEL: usize = 1024;

fn model() -> ModelSpec {
    ModelSpec { d_model: D_MODEL as u32, d_ff: 64, seed: 5, ..ModelSpec::default_synthetic() }
}

fn hidden(tokens: usize) -> Vec<f32> {
    (0..tokens * D_MODEL).map(|i| ((i as f32) * 0.61).cos()).collect()
}

/// Workers "a" (even experts) and "b" (odd ones), a client over them, and its transport; the
/// cluster's largest batch is `largest_batch` tokens.
async fn client(
    dispatch: DispatchLayout,
    largest_batch: u32,
) -> (MoeClient, Arc<support::Observed>, [Arc<ExpertWorker>; 2]) {
    let worker = |parity: u32| {
        let experts = (0..8).filter(|expert| expert % 2 == parity).map(|expert| ExpertId::new(0, expert)).collect();
        support::cpu_worker(model(), experts, 1 << 20, Duration::ZERO)
    };
    let (a, b) = (worker(0).await, worker(1).await);
    let workers = InProcessTransport::new([
        (Arc::from("a"), ExpertWorkerService::new(a.clone(), "a")),
        (Arc::from("b"), ExpertWorkerService::new(b.clone(), "b")),
    ]);
    let transport = Arc::new(support::Observed::new(workers, None));
    let mut table = (*support::table(&model(), 1, |expert| vec![if expert % 2 == 0 { "a" } else { "b" }])).clone();
    table.max_batch_tokens = largest_batch;
    let (_tables, receiver) = watch::channel(Some(Arc::new(table)));
    let options = ClientOptions { dispatch, ..ClientOptions::default() };
    (MoeClient::with_transport(receiver, options, transport.clone()), transport, [a, b])
}

/// Each worker was sent its rows and answered as many, f32 both ways (token-major: a row per token
/// and its one weighted sum back; expert-major: a row per assignment and its expert's output), in
/// messages a little larger than their payloads; the call's bytes are the workers' together.
fn assert_bytes_balance(output: &LayerOutput, dispatch: DispatchLayout) {
    let row_bytes = (D_MODEL * 4) as u64;
    for call in &output.workers {
        let (rows, bytes) = (call.rows as u64, call.bytes);
        assert!(call.requests > 0 && rows > 0, "{dispatch:?}: {call:?}");
        assert_eq!((bytes.payload_sent, bytes.payload_received), (rows * row_bytes, rows * row_bytes), "{call:?}");
        assert!(bytes.message_sent > bytes.payload_sent, "{call:?}");
        assert!(bytes.message_received > bytes.payload_received, "{call:?}");
    }
    let rows: usize = output.workers.iter().map(|call| call.rows).sum();
    match dispatch {
        DispatchLayout::TokenMajor => assert!(rows <= 2 * output.routing.tokens, "a token goes once to each worker"),
        DispatchLayout::ExpertMajor => assert_eq!(rows, output.routing.tokens_per_expert.iter().sum::<u32>() as usize),
    }
    let sent: u64 = output.workers.iter().map(|call| call.bytes.payload_sent).sum();
    let received: u64 = output.workers.iter().map(|call| call.bytes.payload_received).sum();
    assert_eq!((output.bytes.payload_sent, output.bytes.payload_received), (sent, received));
}

/// The straggler's RPC is the call's network, queue and compute time; the summing left after the
/// last answer is split between decode and combine as the answers' decode and combine times are.
/// Returns whether the call had such a tail to check.
fn assert_times_add_up(output: &LayerOutput) -> bool {
    let timing = output.timing;
    let straggler = output.workers.iter().map(|call| call.rpc).max().expect("two workers");
    assert_eq!(timing.network + timing.queue_wait + timing.compute, straggler, "{timing:?}");
    let decode: Duration = output.workers.iter().map(|call| call.decode).sum();
    let combine: Duration = output.workers.iter().map(|call| call.combine).sum();
    let tail = timing.decode + timing.combine;
    assert!(tail <= timing.wall, "{timing:?}");
    let has_tail = tail >= Duration::from_micros(20);
    if has_tail {
        let share = decode.as_secs_f64() / (decode + combine).as_secs_f64();
        let booked = timing.decode.as_secs_f64() / tail.as_secs_f64();
        assert!((booked - share).abs() < 0.01, "decode's share {booked} of the tail, {share} of the answers");
    }
    has_tail
}

#[tokio::test]
async fn each_worker_is_booked_its_rows_and_bytes_both_ways_and_the_straggler_s_time() {
    for dispatch in [DispatchLayout::TokenMajor, DispatchLayout::ExpertMajor] {
        let (client, transport, workers) = client(dispatch, 1 << 20).await;
        let mut tails = 0;
        // Where the async task notices the last answer late (a loaded machine), the pool may have
        // summed it already and the call has no tail to split: more calls then, until one has.
        for tokens in [256, 1024].into_iter().chain(std::iter::repeat_n(1024, 30)) {
            let output = client.forward(0, hidden(tokens)).await.expect("both workers answer");
            let endpoints: Vec<&str> = output.workers.iter().map(|call| &*call.endpoint).collect();
            assert_eq!(endpoints, ["a", "b"]);
            assert_bytes_balance(&output, dispatch);
            let carried = transport.take_message_bytes();
            for call in &output.workers {
                let booked = MessageBytes { sent: call.bytes.message_sent, answered: call.bytes.message_received };
                assert_eq!(
                    booked, carried[&call.endpoint],
                    "{dispatch:?}: the messages {} was sent and answered",
                    call.endpoint
                );
            }
            tails += usize::from(assert_times_add_up(&output));
            if tails > 0 && tokens == 1024 {
                break;
            }
        }
        assert!(tails > 0, "{dispatch:?}: some summing came after the last answer in 32 calls");
        for worker in workers {
            worker.shutdown().await;
        }
    }
}

#[tokio::test]
async fn request_ids_carry_the_process_id_in_their_high_bits() {
    let (client, transport, workers) = client(DispatchLayout::TokenMajor, 1 << 20).await;
    for _ in 0..2 {
        client.forward(0, hidden(8)).await.expect("both workers answer");
    }
    let ids = transport.request_ids();
    assert_eq!(ids.len(), 4, "two calls, two workers each");
    assert!(ids.iter().all(|id| id >> 32 == u64::from(std::process::id())), "{ids:x?}");
    let calls: std::collections::BTreeSet<u64> = ids.iter().map(|id| id & 0xffff_ffff).collect();
    assert_eq!(calls.len(), 2, "the requests of one call share its id, and calls differ: {ids:x?}");
    for worker in workers {
        worker.shutdown().await;
    }
}

#[tokio::test]
async fn a_call_past_the_cluster_s_largest_batch_is_refused_before_anything_is_sent() {
    let (client, transport, workers) = client(DispatchLayout::TokenMajor, 32).await;
    client.forward(0, hidden(32)).await.expect("the largest batch itself goes");
    let sent = transport.request_ids().len();
    let refused = client.forward(0, hidden(33)).await.unwrap_err();
    match refused {
        ClientError::InvalidInput { field, reason } => {
            assert_eq!(field, "hidden");
            assert!(reason.starts_with("33 tokens exceed the cluster's largest batch, 32 tokens"), "{reason}");
        }
        other => panic!("expected the hidden states refused, got {other:?}"),
    }
    assert_eq!(transport.request_ids().len(), sent, "nothing of the refused call was sent");
    for worker in workers {
        worker.shutdown().await;
    }
}
