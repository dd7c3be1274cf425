//! Fuzz target for the worker's request path: `Forward` bodies (valid requests of both layouts with
//! a few bytes changed, inserted or cut, and random bytes) are decoded, validated and, when
//! accepted, run by a worker. Every one must end as an answer or a named refusal, never a panic,
//! and the worker must keep serving. Runs in the test command; `PROPTEST_CASES` scales it.

use std::sync::Arc;
use std::time::Duration;
use switchyard_model::fuzzing::{mutated, random_bytes};

use proptest::prelude::*;
use prost::Message;
use switchyard_expert_worker::request::ForwardBatch;
use switchyard_expert_worker::scheduler::BatchingConfig;
use switchyard_expert_worker::worker::QueueLimits;
use switchyard_expert_worker::{ExpertWorker, WorkerOptions};
use switchyard_model::{ExpertId, ModelSpec};
use switchyard_proto::v1;
use switchyard_proto::wire::{self, WireDtype};

const WIDTH: usize = 8;

fn tiny_model() -> ModelSpec {
    ModelSpec { d_model: WIDTH as u32, d_ff: 16, experts_per_layer: 4, seed: 3, ..ModelSpec::default_synthetic() }
}

fn rows(count: usize) -> bytes::Bytes {
    let values: Vec<f32> = (0..count * WIDTH).map(|i| (i as f32 * 0.3).sin()).collect();
    wire::encode_rows(&values, WIDTH, WireDtype::F32)
}

fn tensor(count: usize) -> v1::WireTensor {
    v1::WireTensor {
        dtype: WireDtype::F32.to_proto() as i32,
        shape: vec![count as u64, WIDTH as u64],
        data: rows(count),
    }
}

fn words<T: Copy>(values: &[T], bytes: fn(T) -> [u8; 4]) -> bytes::Bytes {
    values.iter().flat_map(|value| bytes(*value)).collect::<Vec<u8>>().into()
}

/// A token-major request (3 tokens choosing experts of layer 0) and an expert-major one.
fn seeds() -> [Vec<u8>; 2] {
    let token_major = v1::ForwardRequest {
        request_id: 1,
        tokens: Some(v1::TokenRows {
            layer: 0,
            rows: Some(tensor(3)),
            offsets: words(&[0u32, 2, 3, 4], u32::to_le_bytes),
            experts: words(&[0u32, 1, 2, 3], u32::to_le_bytes),
            weights: words(&[0.5f32, 0.5, 1.0, 1.0], f32::to_le_bytes),
        }),
        ..Default::default()
    };
    let expert_major = v1::ForwardRequest {
        request_id: 2,
        batches: vec![
            v1::ExpertRows { expert: Some(v1::ExpertKey::new(0, 1)), rows: Some(tensor(2)) },
            v1::ExpertRows { expert: Some(v1::ExpertKey::new(0, 3)), rows: Some(tensor(1)) },
        ],
        ..Default::default()
    };
    [token_major.encode_to_vec(), expert_major.encode_to_vec()]
}

fn hostile() -> impl Strategy<Value = Vec<u8>> {
    let [token_major, expert_major] = seeds();
    prop_oneof![2 => mutated(token_major), 2 => mutated(expert_major), 1 => random_bytes()]
}

struct Served {
    runtime: tokio::runtime::Runtime,
    worker: Arc<ExpertWorker>,
}

fn served() -> Served {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let options = WorkerOptions {
        batching: BatchingConfig { batch_wait: Duration::ZERO, max_batch_tokens: 64 },
        default_queue_limit_tokens: 64,
        memory_bytes: Some(1 << 30),
        ..WorkerOptions::in_process(tch::Device::Cpu)
    };
    let worker = ExpertWorker::start(options, Default::default()).expect("compute thread");
    let experts = (0..4).map(|expert| ExpertId::new(0, expert)).collect();
    runtime.block_on(worker.load_experts(tiny_model(), experts, QueueLimits::default())).expect("load");
    Served { runtime, worker }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn hostile_forward_bodies_are_answered_or_refused(bytes in hostile()) {
        thread_local! { static SERVED: Served = served(); }
        let Ok(request) = v1::ForwardRequest::decode(bytes.as_slice()) else { return Ok(()) };
        let Ok(batch) = ForwardBatch::try_from(request) else { return Ok(()) };
        let rows = batch.total_tokens();
        SERVED.with(|served| {
            match served.runtime.block_on(served.worker.forward(batch)) {
                Ok(outcome) => {
                    let answered: usize = outcome.outputs.iter().map(|output| output.tokens).sum();
                    prop_assert_eq!(answered, rows, "every admitted row is answered");
                }
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
            Ok(())
        })?;
    }
}
