//! Fuzz target for the worker's request path: `Forward` bodies (valid requests of both layouts with
//! a few bytes changed, inserted or cut, and random bytes) are decoded, validated and, when
//! accepted, run by a worker. Every one must end as an answer or a named refusal, never a panic,
//! and the worker must keep serving. Well-formed requests whose shapes, counts and lists disagree
//! (counts at the edges where arithmetic on them overflows) must be refused, or accepted only where
//! their bytes bear them out. Runs in the test command; `PROPTEST_CASES` scales it.

use std::sync::Arc;
use std::time::Duration;
use switchyard_model::fuzzing::{mutated, random_bytes};

use proptest::prelude::*;
use prost::Message;
use switchyard_expert_worker::request::{ForwardBatch, RowsSource};
use switchyard_expert_worker::scheduler::BatchingConfig;
use switchyard_expert_worker::worker::QueueLimits;
use switchyard_expert_worker::{ExpertWorker, WorkerError, WorkerOptions};
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

/// A count from the wire: small, or at an edge where arithmetic on it overflows.
fn wire_count() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0), 1..40u64, Just(WIDTH as u64), Just(u64::MAX), Just(1 << 62), Just(1 << 63), Just(1 << 32)]
}

fn wire_tensor() -> impl Strategy<Value = v1::WireTensor> {
    let bytes = prop_oneof![Just(None), Just(Some(0)), (1..200usize).prop_map(Some)];
    (0..6i32, proptest::collection::vec(wire_count(), 0..4), bytes).prop_map(|(dtype, shape, bytes)| {
        let fitting = || {
            let row_bytes =
                WireDtype::try_from(dtype).ok()?.checked_row_bytes(usize::try_from(*shape.get(1)?).ok()?)?;
            Some(usize::try_from(shape[0]).ok()?.checked_mul(row_bytes)?).filter(|bytes| *bytes < 4096)
        };
        let bytes = bytes.or_else(fitting).unwrap_or(0);
        v1::WireTensor { dtype, shape, data: vec![0u8; bytes].into() }
    })
}

/// Little-endian words, mostly small: offsets that may rise, experts the worker may serve.
fn wire_words() -> impl Strategy<Value = bytes::Bytes> {
    let word = prop_oneof![0..6u32, Just(u32::MAX)];
    prop_oneof![Just(Vec::new()), proptest::collection::vec(word, 1..12)]
        .prop_map(|words| words.iter().flat_map(|word| word.to_le_bytes()).collect::<Vec<u8>>().into())
}

/// Well-formed protobuf whose shapes, counts and lists disagree with each other and with the bytes
/// they describe: what byte mutations of a valid request rarely reach (a varint of 2^62).
fn inconsistent() -> impl Strategy<Value = v1::ForwardRequest> {
    let part = (proptest::option::weighted(0.9, wire_tensor()), 0..5u32)
        .prop_map(|(rows, expert)| v1::ExpertRows { expert: Some(v1::ExpertKey::new(0, expert)), rows });
    let tokens =
        (wire_tensor(), wire_words(), wire_words(), wire_words()).prop_map(|(rows, offsets, experts, weights)| {
            v1::TokenRows { layer: 0, rows: Some(rows), offsets, experts, weights }
        });
    (proptest::collection::vec(part, 0..3), proptest::option::of(tokens), 0..6i32).prop_map(
        |(batches, tokens, output_dtype)| v1::ForwardRequest {
            request_id: 3,
            batches: if tokens.is_some() { Vec::new() } else { batches },
            tokens,
            output_dtype,
            sequence: 0,
        },
    )
}

/// Token-major requests whose lists agree with each other and with their rows, as a client builds
/// them, but whose choices may repeat an expert for a token or name one the worker does not serve,
/// and whose rows may not be the worker's width.
fn chosen() -> impl Strategy<Value = v1::ForwardRequest> {
    let choices = proptest::collection::vec(proptest::collection::vec(0..6u32, 0..4), 0..5);
    let width = prop_oneof![3 => Just(WIDTH), 1 => 1..12usize];
    (choices, width, proptest::sample::select(WireDtype::ALL.to_vec())).prop_map(|(choices, width, dtype)| {
        let mut offsets = vec![0u32];
        for token in &choices {
            offsets.push(offsets[offsets.len() - 1] + token.len() as u32);
        }
        let experts = choices.concat();
        let weights = vec![0.5f32; experts.len()];
        let rows = v1::WireTensor {
            dtype: dtype.to_proto() as i32,
            shape: vec![choices.len() as u64, width as u64],
            data: vec![0u8; choices.len() * dtype.row_bytes(width)].into(),
        };
        v1::ForwardRequest {
            request_id: 4,
            tokens: Some(v1::TokenRows {
                layer: 0,
                rows: Some(rows),
                offsets: words(&offsets, u32::to_le_bytes),
                experts: words(&experts, u32::to_le_bytes),
                weights: words(&weights, f32::to_le_bytes),
            }),
            ..Default::default()
        }
    })
}

/// What an accepted batch claims matches its bytes: no count the worker computes from it overflows.
fn check_counts(batch: &ForwardBatch) -> Result<(), TestCaseError> {
    let mut tokens = 0usize;
    for part in &batch.parts {
        prop_assert!(part.width > 0);
        match &part.rows {
            RowsSource::Own(data) => prop_assert_eq!(data.len(), part.tokens * part.dtype.row_bytes(part.width)),
            RowsSource::Gathered(gathered) => {
                let shared = &gathered.shared;
                prop_assert_eq!(shared.data.len(), shared.tokens * shared.dtype.row_bytes(shared.width));
                prop_assert_eq!((gathered.indices.len(), gathered.weights.len()), (part.tokens, part.tokens));
                prop_assert!(gathered.indices.windows(2).all(|pair| pair[0] < pair[1]));
                prop_assert!(gathered.indices.iter().all(|index| (*index as usize) < shared.tokens));
            }
        }
        tokens = tokens.checked_add(part.tokens).expect("an accepted batch's rows are counted in a usize");
    }
    prop_assert_eq!(batch.total_tokens(), tokens);
    Ok(())
}

/// A request is refused as malformed, naming a field of the request, or as more than an expert's
/// queue takes (the worker's limit is 64 tokens): never as a failed compute or a panic.
fn check_refusal(error: &WorkerError) -> Result<(), TestCaseError> {
    const FIELDS: [&str; 3] = ["batches[", "tokens", "output_dtype"];
    match error {
        WorkerError::InvalidArgument { field, reason } => {
            prop_assert!(FIELDS.iter().any(|root| field.starts_with(root)), "{} names no request field", field);
            prop_assert!(!reason.is_empty(), "{} is refused without a reason", field);
        }
        WorkerError::QueueFull { limit, queued, requested, .. } => prop_assert!(queued + requested > *limit),
        other => prop_assert!(false, "a hostile request is refused as {:?}", other),
    }
    Ok(())
}

/// Runs an accepted batch: every admitted row is answered, or the whole batch is refused by name.
fn answer_or_refuse(batch: ForwardBatch) -> Result<(), TestCaseError> {
    thread_local! { static SERVED: Served = served(); }
    let rows = batch.total_tokens();
    SERVED.with(|served| {
        match served.runtime.block_on(served.worker.forward(batch)) {
            Ok(outcome) => {
                let answered: usize = outcome.outputs.iter().map(|output| output.tokens).sum();
                prop_assert_eq!(answered, rows, "every admitted row is answered");
            }
            Err(error) => check_refusal(&error)?,
        }
        Ok(())
    })
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
        let Ok(request) = v1::ForwardRequest::decode(bytes.as_slice()) else { return Ok(()) };
        match ForwardBatch::try_from(request) {
            Ok(batch) => answer_or_refuse(batch)?,
            Err(error) => check_refusal(&error)?,
        }
    }

    #[test]
    fn inconsistent_shapes_and_counts_are_refused_or_match_their_bytes(
        request in prop_oneof![inconsistent(), chosen()]
    ) {
        match ForwardBatch::try_from(request) {
            Ok(batch) => {
                check_counts(&batch)?;
                answer_or_refuse(batch)?;
            }
            Err(error) => check_refusal(&error)?,
        }
    }
}
