//! The worker without processes: the plain struct directly, and its gRPC server on 127.0.0.1:0.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use switchyard_expert_worker::metrics::WorkerMetrics;
use switchyard_expert_worker::request::{ExpertRowsIn, ForwardBatch, RowsSource};
use switchyard_expert_worker::scheduler::BatchingConfig;
use switchyard_expert_worker::staging::ALIGN;
use switchyard_expert_worker::worker::{ForwardOutcome, QueueLimits};
use switchyard_expert_worker::{Args, ExpertWorker, WorkerError, WorkerOptions};
use switchyard_experts::Expert;
use switchyard_model::ExpertId;
use switchyard_model::{ModelSpec, WeightDtype};
use switchyard_proto::v1::{self, expert_worker_client::ExpertWorkerClient};
use switchyard_proto::wire;
use switchyard_proto::wire::WireDtype;
use tonic::Code;

fn tiny_model() -> ModelSpec {
    ModelSpec { d_model: 16, d_ff: 32, experts_per_layer: 4, seed: 11, ..ModelSpec::default_synthetic() }
}

fn rows(count: usize, width: usize, salt: f32) -> Vec<f32> {
    (0..count * width).map(|i| (i as f32 * 0.37 + salt).sin()).collect()
}

fn part(index: usize, expert: u32, values: &[f32], width: usize, dtype: WireDtype) -> ExpertRowsIn {
    ExpertRowsIn {
        index,
        expert: ExpertId::new(0, expert),
        dtype,
        tokens: values.len() / width,
        width,
        rows: RowsSource::Own(wire::encode_rows(values, width, dtype)),
    }
}

/// An expert-major request of `parts`, answered in each part's own dtype.
fn expert_major(request_id: u64, parts: Vec<ExpertRowsIn>) -> ForwardBatch {
    ForwardBatch { request_id, parts, output_dtype: None, token_major: None }
}

/// Both requests announced before either is admitted, as two requests on the wire at once are:
/// the first one's rows wait for the second's (up to the batch wait bound).
async fn forward_together(
    worker: &ExpertWorker,
    first: ForwardBatch,
    second: ForwardBatch,
) -> (Result<ForwardOutcome, WorkerError>, Result<ForwardOutcome, WorkerError>) {
    let (first_arriving, second_arriving) = (worker.announce(), worker.announce());
    tokio::join!(
        worker.forward_arrived(first, Some(first_arriving)),
        worker.forward_arrived(second, Some(second_arriving))
    )
}

async fn started(batch_wait: Duration, limit: usize) -> std::sync::Arc<ExpertWorker> {
    started_with(batch_wait, limit, false).await
}

async fn started_with(batch_wait: Duration, limit: usize, identity_experts: bool) -> std::sync::Arc<ExpertWorker> {
    let options = WorkerOptions {
        batching: BatchingConfig { batch_wait, max_batch_tokens: 1024 },
        default_queue_limit_tokens: limit,
        identity_experts,
        ..WorkerOptions::in_process(tch::Device::Cpu)
    };
    started_from(options, WorkerMetrics::new()).await
}

/// A worker started with `options`, the tiny model's four experts of layer 0 loaded.
async fn started_from(options: WorkerOptions, metrics: WorkerMetrics) -> std::sync::Arc<ExpertWorker> {
    let worker = ExpertWorker::start(options, metrics).expect("compute thread");
    worker
        .load_experts(tiny_model(), (0..4).map(|e| ExpertId::new(0, e)).collect(), QueueLimits::default())
        .await
        .expect("load");
    worker
}

fn relative_error(want: &[f32], have: &[f32]) -> f32 {
    let diff: f32 = want.iter().zip(have).map(|(a, b)| (a - b) * (a - b)).sum();
    let norm: f32 = want.iter().map(|a| a * a).sum();
    (diff / norm).sqrt()
}

#[tokio::test]
async fn outputs_equal_the_expert_computed_directly() {
    let worker = started(Duration::ZERO, 1024).await;
    let spec = tiny_model();
    let (x1, x3) = (rows(5, 16, 0.1), rows(3, 16, 0.9));
    let batch = expert_major(1, vec![part(0, 1, &x1, 16, WireDtype::F32), part(1, 3, &x3, 16, WireDtype::F32)]);
    let outcome = worker.forward(batch).await.expect("forward");
    assert_eq!(outcome.outputs.len(), 2);
    for (output, (expert, input)) in outcome.outputs.iter().zip([(1, &x1), (3, &x3)]) {
        let want = Expert::synthetic(&spec, 0, expert, tch::Device::Cpu, WeightDtype::F32).forward_f32(input);
        let have = wire::decode_f32(&output.data, output.dtype);
        assert_eq!((output.expert, output.tokens), (ExpertId::new(0, expert), input.len() / 16));
        assert!(relative_error(&want, &have) < 1e-6, "expert {expert}");
    }
    worker.shutdown().await;
}

#[tokio::test]
async fn bf16_rows_come_back_in_the_asked_dtype() {
    let worker = started(Duration::ZERO, 1024).await;
    let x = rows(4, 16, 0.3);
    let batch = ForwardBatch {
        request_id: 2,
        parts: vec![part(0, 0, &x, 16, WireDtype::Bf16)],
        output_dtype: Some(WireDtype::F32),
        token_major: None,
    };
    let outcome = worker.forward(batch).await.expect("forward");
    assert_eq!(outcome.outputs[0].dtype, WireDtype::F32);
    assert_eq!(outcome.outputs[0].data.len(), 4 * 16 * 4);
    let want = Expert::synthetic(&tiny_model(), 0, 0, tch::Device::Cpu, WeightDtype::F32).forward_f32(&x);
    let have = wire::decode_f32(&outcome.outputs[0].data, WireDtype::F32);
    assert!(relative_error(&want, &have) < 2e-2, "bf16 input keeps about 3 significant digits");
    worker.shutdown().await;
}

#[tokio::test]
async fn concurrent_requests_of_one_expert_merge_into_one_forward() {
    // A generous wait bound: the step starts as soon as the second request is in, not after it.
    let worker = started(Duration::from_millis(300), 1024).await;
    let (a, b) = (rows(3, 16, 0.2), rows(6, 16, 0.7));
    let first = expert_major(1, vec![part(0, 2, &a, 16, WireDtype::F32)]);
    let second = expert_major(2, vec![part(0, 2, &b, 16, WireDtype::F32)]);
    let (first, second) = forward_together(&worker, first, second).await;
    let (first, second) = (first.expect("first"), second.expect("second"));
    assert_eq!(first.outputs[0].batch_tokens, 9, "one forward of 3 + 6 rows");
    assert_eq!(second.outputs[0].batch_tokens, 9);
    let expert = Expert::synthetic(&tiny_model(), 0, 2, tch::Device::Cpu, WeightDtype::F32);
    for (outcome, input) in [(&first, &a), (&second, &b)] {
        let have = wire::decode_f32(&outcome.outputs[0].data, WireDtype::F32);
        assert!(relative_error(&expert.forward_f32(input), &have) < 1e-6, "rows split back to their request");
    }
    worker.shutdown().await;
}

/// Two requests queued together make one step: expert 1 merges f32 rows of one request with bf16
/// rows of the other (two runs of one batch), experts 2 and 3 run beside it, answers come back in
/// each request's asked dtype, and the step's time is shared out by each batch's rows.
#[tokio::test]
async fn one_step_serves_every_expert_with_mixed_dtypes() {
    let worker = started(Duration::from_millis(300), 1024).await;
    let spec = tiny_model();
    let (a1, a3, b1, b2) = (rows(3, 16, 0.1), rows(4, 16, 0.4), rows(2, 16, 0.6), rows(5, 16, 0.8));
    let first = expert_major(1, vec![part(0, 1, &a1, 16, WireDtype::F32), part(1, 3, &a3, 16, WireDtype::Bf16)]);
    let second = ForwardBatch {
        request_id: 2,
        parts: vec![part(0, 1, &b1, 16, WireDtype::Bf16), part(1, 2, &b2, 16, WireDtype::F32)],
        output_dtype: Some(WireDtype::F16),
        token_major: None,
    };
    let (first, second) = forward_together(&worker, first, second).await;
    let (first, second) = (first.expect("first"), second.expect("second"));
    let answers = [
        (&first.outputs[0], 1, &a1, WireDtype::F32, 3 + 2, 1e-6),
        (&first.outputs[1], 3, &a3, WireDtype::Bf16, 4, 2e-2),
        (&second.outputs[0], 1, &b1, WireDtype::F16, 3 + 2, 2e-2),
        (&second.outputs[1], 2, &b2, WireDtype::F16, 5, 2e-3),
    ];
    for (output, expert, input, dtype, batch_tokens, tolerance) in answers {
        let want = Expert::synthetic(&spec, 0, expert, tch::Device::Cpu, WeightDtype::F32).forward_f32(input);
        let have = wire::decode_f32(&output.data, output.dtype);
        assert_eq!((output.expert.expert, output.dtype, output.batch_tokens), (expert, dtype, batch_tokens));
        assert!(relative_error(&want, &have) < tolerance, "expert {expert}: {}", relative_error(&want, &have));
    }
    // Equal experts: the step's time splits as their rows, 5 : 4 : 5.
    let (expert_1, expert_3, expert_2) =
        (first.outputs[0].compute, first.outputs[1].compute, second.outputs[1].compute);
    assert!(expert_1 > Duration::ZERO && expert_1 == second.outputs[0].compute && expert_1 == expert_2);
    let ratio = expert_1.as_secs_f64() / expert_3.as_secs_f64();
    assert!((ratio - 1.25).abs() < 1e-3, "5 rows against 4 (to the nanosecond): {ratio}");
    worker.shutdown().await;
}

#[tokio::test]
async fn queue_limit_refuses_and_unloading_closes_the_queue() {
    let worker = started(Duration::ZERO, 4).await;
    let x = rows(5, 16, 0.5);
    let batch = expert_major(3, vec![part(0, 1, &x, 16, WireDtype::F32)]);
    let error = worker.forward(batch).await.unwrap_err();
    assert!(matches!(error, WorkerError::QueueFull { requested: 5, limit: 4, .. }), "{error}");
    assert_eq!(worker.unload_experts(vec![ExpertId::new(0, 1)]).await.expect("unload"), vec![ExpertId::new(0, 1)]);
    let batch = expert_major(4, vec![part(0, 1, &x[..16], 16, WireDtype::F32)]);
    assert!(worker.forward(batch).await.unwrap_err().to_string().contains("not served by this worker"));
    worker.shutdown().await;
}

/// An expert listed twice in one load is built, counted against the memory offered and answered
/// once: with room for exactly one more expert, a load naming it three times fits.
#[tokio::test]
async fn an_expert_listed_twice_is_loaded_once() {
    let expert_bytes = tiny_model().expert_bytes_of(0, WeightDtype::F32);
    let options = WorkerOptions { memory_bytes: Some(5 * expert_bytes), ..WorkerOptions::in_process(tch::Device::Cpu) };
    let worker = started_from(options, WorkerMetrics::new()).await;
    let other_layer = ModelSpec { moe_layers: vec![0, 1], ..tiny_model() };
    let again = vec![ExpertId::new(1, 2), ExpertId::new(1, 2), ExpertId::new(1, 2)];
    let loaded = worker.load_experts(other_layer, again, QueueLimits::default()).await.expect("one expert fits");
    assert_eq!(loaded, [ExpertId::new(1, 2)]);
    assert_eq!(worker.resident_bytes(), 5 * expert_bytes);
    assert_eq!(worker.resident_experts().len(), 5);
    worker.shutdown().await;
}

/// Starts the real gRPC server on 127.0.0.1:0 with experts loaded through its own RPC.
type GrpcWorker = (ExpertWorkerClient<tonic::transport::Channel>, tokio::sync::oneshot::Sender<()>);

async fn grpc_worker(limit: u32) -> GrpcWorker {
    grpc_worker_with(limit, &[]).await.0
}

/// A worker's gRPC server on 127.0.0.1:0 with `flags`, its experts loaded; the client, the stop
/// signal and the server's URI.
async fn grpc_worker_with(limit: u32, flags: &[&str]) -> (GrpcWorker, String) {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = grpc.local_addr().expect("address");
    let batch_wait: &[&str] = if flags.contains(&"--batch-wait-us") { &[] } else { &["--batch-wait-us", "0"] };
    let command = ["switchyard-worker", "--device", "cpu"].iter().chain(batch_wait).chain(flags).copied();
    let args = <Args as clap::Parser>::try_parse_from(command).expect("args");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(switchyard_expert_worker::run(grpc, metrics, args, async {
        let _ = stopped.await;
    }));
    let uri = format!("http://{address}");
    let channel = switchyard_common::transport::channel(&uri).expect("channel");
    let mut client = ExpertWorkerClient::new(channel);
    let experts = (0..4).map(|e| v1::ExpertKey::new(0, e)).collect();
    let load = v1::LoadExpertsRequest {
        model: Some(tiny_model().to_proto()),
        experts,
        queue_limit_tokens: limit,
        shared_queue_limit_tokens: 0,
    };
    let mut attempts = 0;
    while let Err(status) = client.load_experts(load.clone()).await {
        attempts += 1;
        assert!(attempts < 50, "worker never answered: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ((client, stop), uri)
}

fn wire_request(expert: u32, dtype: i32, shape: Vec<u64>, data: Bytes) -> v1::ForwardRequest {
    v1::ForwardRequest {
        request_id: 9,
        batches: vec![v1::ExpertRows {
            expert: Some(v1::ExpertKey::new(0, expert)),
            rows: Some(v1::WireTensor { dtype, shape, data }),
        }],
        output_dtype: 0,
        tokens: None,
        sequence: 0,
    }
}

#[tokio::test]
async fn grpc_errors_name_the_field_and_the_worker_keeps_serving() {
    let (mut client, _stop) = grpc_worker(8).await;
    let good = wire::encode_f32(&rows(2, 16, 0.4), WireDtype::F32);
    let cases = [
        (
            wire_request(0, 1, vec![2, 8], wire::encode_f32(&rows(2, 8, 0.1), WireDtype::F32)),
            Code::InvalidArgument,
            "batches[0].rows.shape",
        ),
        (wire_request(0, 1, vec![2, 16], good.slice(..100)), Code::InvalidArgument, "batches[0].rows.data"),
        (wire_request(7, 1, vec![2, 16], good.clone()), Code::InvalidArgument, "batches[0].expert"),
        (wire_request(0, 0, vec![2, 16], good.clone()), Code::InvalidArgument, "batches[0].rows.dtype"),
        (
            wire_request(3, 1, vec![9, 16], wire::encode_f32(&rows(9, 16, 0.1), WireDtype::F32)),
            Code::ResourceExhausted,
            "layer 0 expert 3",
        ),
    ];
    for (request, code, named) in cases {
        let status = client.forward(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(status.message().contains(named), "'{}' should name {named}", status.message());
    }
    let answer = client.forward(wire_request(0, 1, vec![2, 16], good)).await.expect("still serving").into_inner();
    assert_eq!(answer.outputs[0].rows.as_ref().map(|rows| rows.shape.clone()), Some(vec![2, 16]));
    let stats = client.get_stats(v1::GetStatsRequest {}).await.expect("stats").into_inner();
    let expert3 = stats.experts.iter().find(|e| e.expert == Some(v1::ExpertKey::new(0, 3))).expect("expert 3");
    assert_eq!((expert3.rejected_tokens, expert3.queue_limit_tokens), (9, 8));
}

/// A load without queue limits takes the worker's `--queue-limit-tokens`; unloading answers the
/// experts it freed (not one it never held), which then leave the worker's stats.
#[tokio::test]
async fn a_load_without_limits_takes_the_worker_s_and_an_unload_names_what_it_freed() {
    let (mut client, _stop) = grpc_worker(0).await;
    let stats = client.get_stats(v1::GetStatsRequest {}).await.expect("stats").into_inner();
    let limits: Vec<u32> = stats.experts.iter().map(|expert| expert.queue_limit_tokens).collect();
    assert_eq!(limits, [4096; 4], "the worker's default limit");
    let experts = vec![v1::ExpertKey::new(0, 3), v1::ExpertKey::new(0, 9)];
    let unloaded = client.unload_experts(v1::UnloadExpertsRequest { experts }).await.expect("unload").into_inner();
    assert_eq!(unloaded.unloaded, [v1::ExpertKey::new(0, 3)]);
    let stats = client.get_stats(v1::GetStatsRequest {}).await.expect("stats").into_inner();
    let resident: Vec<u32> = stats.experts.iter().filter_map(|expert| expert.expert.map(|key| key.expert)).collect();
    assert_eq!(resident, [0, 1, 2]);
}

/// The server announces a request from its headers and lets it go at its admission: with nothing
/// else on its way, a lone request's step starts at once, however long the batch wait bound.
#[tokio::test]
async fn a_lone_request_does_not_wait_for_the_batch_bound() {
    let ten_minutes = "600000000";
    let ((mut client, _stop), _) = grpc_worker_with(64, &["--batch-wait-us", ten_minutes]).await;
    let request = wire_request(1, 1, vec![2, 16], wire::encode_f32(&rows(2, 16, 0.4), WireDtype::F32));
    let answer = tokio::time::timeout(Duration::from_secs(60), client.forward(request))
        .await
        .expect("answered long before the ten-minute bound")
        .expect("forward")
        .into_inner();
    let timing = answer.outputs[0].timing.expect("timing");
    assert!(timing.queue_wait_us < 60_000_000, "queued {} µs", timing.queue_wait_us);
    assert_eq!((timing.tokens, timing.batch_tokens), (2, 2), "its 2 rows, alone in their batch");
}

#[tokio::test]
async fn the_stream_answers_every_request_and_survives_a_failing_one() {
    let (mut client, _stop) = grpc_worker(64).await;
    let good = || wire_request(1, 1, vec![2, 16], wire::encode_f32(&rows(2, 16, 0.4), WireDtype::F32));
    let mut requests: Vec<_> = (1..=3).map(|id| v1::ForwardRequest { request_id: id, ..good() }).collect();
    requests.push(v1::ForwardRequest { request_id: 4, sequence: 5, ..wire_request(9, 1, vec![2, 16], Bytes::new()) });
    let mut answers = client.forward_stream(futures::stream::iter(requests)).await.expect("stream").into_inner();
    let mut seen = Vec::new();
    while let Some(answer) = answers.message().await.expect("stream message") {
        match answer.error {
            Some(error) => {
                assert_eq!((answer.request_id, answer.sequence, error.code), (4, 5, Code::InvalidArgument as i32));
                assert!(error.message.starts_with("batches[0]"));
            }
            None => assert_eq!(answer.outputs.len(), 1),
        }
        seen.push(answer.request_id);
    }
    seen.sort();
    assert_eq!(seen, [1, 2, 3, 4]);
}

/// A client that sends a `ForwardStream` and never reads its answers stops the worker taking more
/// of its requests once its receive window is full, instead of growing the worker by a task and an
/// answer per request (RSS went from 115 to 3,124 MiB that way); the worker keeps serving others.
#[tokio::test]
async fn a_stream_whose_answers_are_never_read_stops_taking_requests() {
    let (mut client, _stop) = grpc_worker(1 << 20).await;
    let mut reader = client.clone();
    // 64 rows x 16 f32: 4 KiB each way, so the client's 16 MiB stream window holds ~4,000 answers.
    let request = wire_request(1, 1, vec![64, 16], wire::encode_f32(&rows(64, 16, 0.2), WireDtype::F32));
    let sent = 20_000u64;
    let requests =
        futures::stream::iter((0..sent).map(move |id| v1::ForwardRequest { request_id: id, ..request.clone() }));
    let _unread = client.forward_stream(requests).await.expect("stream");
    let admitted = || async {
        let stats = reader.clone().get_stats(v1::GetStatsRequest {}).await.expect("still serving").into_inner();
        stats.experts.iter().map(|expert| expert.admitted_tokens).sum::<u64>() / 64
    };
    let mut settled = admitted().await;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = admitted().await;
        if now == settled && now > 0 {
            break;
        }
        settled = now;
    }
    let window_answers = (switchyard_common::transport::STREAM_WINDOW_BYTES as u64).div_ceil(4096);
    assert!(settled > 0, "the stream was served at first");
    assert!(settled < window_answers + 1024, "{settled} of {sent} requests taken with nobody reading");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(admitted().await, settled, "and no more after it stalled");
    reader.get_stats(v1::GetStatsRequest {}).await.expect("other callers are served");
}

/// A checkpoint path comes from the network: a served worker reads only under `--model-root`
/// (symlinks followed, so a link inside pointing out is refused), and without it none at all.
#[tokio::test]
async fn checkpoints_are_read_only_under_the_model_root() {
    use switchyard_expert_worker::worker::CheckpointAccess;
    let scratch = std::env::temp_dir().join(format!("switchyard-model-root-{}", std::process::id()));
    let (root, outside) = (scratch.join("root"), scratch.join("outside"));
    std::fs::create_dir_all(root.join("inside")).expect("dirs");
    std::fs::create_dir_all(&outside).expect("dirs");
    std::os::unix::fs::symlink(&outside, root.join("escape")).expect("symlink");
    let load = |checkpoints: CheckpointAccess, dir: std::path::PathBuf| async move {
        let options = WorkerOptions {
            batching: BatchingConfig { batch_wait: Duration::ZERO, max_batch_tokens: 64 },
            default_queue_limit_tokens: 64,
            checkpoints,
            ..WorkerOptions::in_process(tch::Device::Cpu)
        };
        let worker = ExpertWorker::start(options, Default::default()).expect("compute thread");
        let spec = ModelSpec { checkpoint: Some(dir.display().to_string()), ..tiny_model() };
        let loaded = worker.load_experts(spec, vec![ExpertId::new(0, 0)], QueueLimits::default()).await;
        worker.shutdown().await;
        loaded.map(|_| ()).unwrap_err().to_string()
    };
    let under = || CheckpointAccess::Under(root.clone());
    for refused in [root.join("escape"), root.join("inside/../../"), "/etc".into()] {
        let error = load(under(), refused.clone()).await;
        assert!(
            error.starts_with("model.checkpoint: ") && error.ends_with("is not a directory under --model-root"),
            "{refused:?}: {error}"
        );
    }
    let error = load(CheckpointAccess::Nowhere, root.join("inside")).await;
    assert!(error.contains("only under --model-root, which is not set"), "{error}");
    // Inside the root the load goes ahead (and fails on the empty directory, as a load).
    let error = load(under(), root.join("inside")).await;
    assert!(!error.starts_with("model.checkpoint"), "{error}");
    std::fs::remove_dir_all(&scratch).expect("clean up");
}

/// A request larger than all the bytes a worker receives at once is refused before it is read
/// (RESOURCE_EXHAUSTED naming the flag), whether it comes alone or on a stream; smaller ones are
/// served.
#[tokio::test]
async fn a_request_past_the_receiving_budget_is_refused_before_it_is_read() {
    let ((mut client, _stop), _) = grpc_worker_with(1024, &["--max-receiving-bytes", "16384"]).await;
    let large = wire_request(1, 1, vec![512, 16], wire::encode_f32(&rows(512, 16, 0.1), WireDtype::F32));
    let status = client.forward(large.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--max-receiving-bytes"), "{}", status.message());
    let small = wire_request(1, 1, vec![8, 16], wire::encode_f32(&rows(8, 16, 0.1), WireDtype::F32));
    for _ in 0..3 {
        client.forward(small.clone()).await.expect("a small request is served, and its share returned");
    }

    // A stream's messages are under the same budget, each taking its share before it is read and
    // giving it back when answered: 40 messages of 2 KiB (five times the budget in all) are served.
    let chunk = wire_request(1, 1, vec![32, 16], wire::encode_f32(&rows(32, 16, 0.1), WireDtype::F32));
    let chunks = (0..40u32).map(move |sequence| v1::ForwardRequest { sequence, ..chunk.clone() });
    let answers = client.forward_stream(futures::stream::iter(chunks)).await.expect("stream").into_inner().collect();
    // A guard against a stream stalled for shares never given back, not a measurement.
    let answers: Vec<_> = tokio::time::timeout(Duration::from_secs(60), answers).await.expect("every share came back");
    assert_eq!(answers.len(), 40);
    for answer in answers {
        let answer = answer.expect("served");
        assert_eq!(answer.error, None, "chunk {}", answer.sequence);
    }
    // One message larger than the budget ends its stream with the same refusal.
    let mut refused = client.forward_stream(futures::stream::iter([large])).await.expect("stream").into_inner();
    let status = refused.next().await.expect("an answer").unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--max-receiving-bytes"), "{}", status.message());
}

/// A `Forward` body that is not a `ForwardRequest` is the caller's fault: INVALID_ARGUMENT, not
/// INTERNAL, and the worker keeps serving.
#[tokio::test]
async fn an_undecodable_forward_is_an_invalid_argument() {
    let ((mut client, _stop), uri) = grpc_worker_with(8, &[]).await;
    let mut channel = switchyard_common::transport::secure_h2_channel(&uri, None).expect("channel");
    // An EchoMessage's field 1 is bytes where a ForwardRequest's is a varint: prost refuses it.
    let garbage = v1::EchoMessage { payload: Bytes::from_static(b"not a request"), discard: false };
    let status = switchyard_proto::zero_copy::unary::<_, _, v1::ForwardResponse>(
        &mut channel,
        switchyard_proto::FORWARD_PATH,
        tonic::Request::new(garbage),
        1 << 20,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("the request is not a valid message"), "{}", status.message());
    client.get_stats(v1::GetStatsRequest {}).await.expect("still serving");
}

/// One `LoadExperts` cannot make a worker allocate without bound (a spec of d_model = d_ff = 2^20
/// used to abort it asking for terabytes): sizes past the model limits fail validation, sizes
/// within them but past the worker's memory are refused before anything is built, and the worker
/// keeps serving.
#[tokio::test]
async fn oversized_models_are_refused_before_anything_is_allocated() {
    let ((mut client, _stop), _) = grpc_worker_with(8, &["--memory-bytes", "1073741824"]).await;
    let load = |spec: ModelSpec| v1::LoadExpertsRequest {
        model: Some(spec.to_proto()),
        experts: vec![v1::ExpertKey::new(0, 0)],
        queue_limit_tokens: 8,
        shared_queue_limit_tokens: 0,
    };
    let huge = ModelSpec { d_model: 1 << 20, d_ff: 1 << 20, ..tiny_model() };
    let status = client.load_experts(load(huge)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("model.d_model (1048576) is above the largest served"), "{}", status.message());
    // 3 x 2^16 x 2^18 f32 weights: 192 GiB, within the limits, far past the 1 GiB offered.
    let within_limits = ModelSpec { d_model: 1 << 16, d_ff: 1 << 18, ..tiny_model() };
    let status = client.load_experts(load(within_limits)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("this worker offers 1073741824"), "{}", status.message());
    let stats = client.get_stats(v1::GetStatsRequest {}).await.expect("still serving").into_inner();
    assert_eq!(stats.resident_bytes, (4 * 16 * 32 * 3 * 4) as u64, "only the tiny model's 4 experts are held");
}

#[tokio::test]
async fn per_expert_series_count_admitted_and_refused_rows_only_when_asked() {
    use switchyard_expert_worker::metrics::registry_with;
    let render = |metrics: &WorkerMetrics| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry_with(metrics, &Default::default()))
            .expect("encode");
        text
    };
    assert!(!render(&WorkerMetrics::new()).contains("expert_admitted_tokens"), "off by default");

    let metrics = WorkerMetrics::new().with_per_expert_series();
    let options = WorkerOptions {
        batching: BatchingConfig { batch_wait: Duration::ZERO, max_batch_tokens: 1024 },
        default_queue_limit_tokens: 6,
        ..WorkerOptions::in_process(tch::Device::Cpu)
    };
    let worker = started_from(options, metrics.clone()).await;
    let (five, three, seven) = (rows(5, 16, 0.1), rows(3, 16, 0.2), rows(7, 16, 0.3));
    let batch = |parts| expert_major(1, parts);
    worker
        .forward(batch(vec![part(0, 1, &five, 16, WireDtype::F32), part(1, 3, &three, 16, WireDtype::F32)]))
        .await
        .expect("fits");
    assert!(worker.forward(batch(vec![part(0, 1, &seven, 16, WireDtype::F32)])).await.is_err(), "7 rows > limit 6");
    let text = render(&metrics);
    assert!(text.contains("switchyard_worker_expert_admitted_tokens_total{layer=\"0\",expert=\"1\"} 5"), "{text}");
    assert!(text.contains("switchyard_worker_expert_admitted_tokens_total{layer=\"0\",expert=\"3\"} 3"), "{text}");
    assert!(text.contains("switchyard_worker_expert_rejected_tokens_total{layer=\"0\",expert=\"1\"} 7"), "{text}");
    worker.shutdown().await;
}

/// A token-major request as the wire carries it: each token's row once, with the experts it chose
/// and their weights, as little-endian CSR.
fn token_major_request(
    request_id: u64,
    hidden: &[f32],
    width: usize,
    choices: &[&[(u32, f32)]],
    dtype: WireDtype,
) -> v1::ForwardRequest {
    let mut offsets = vec![0u32];
    let (mut experts, mut weights) = (Vec::new(), Vec::new());
    for token in choices {
        for (expert, weight) in *token {
            experts.extend(expert.to_le_bytes());
            weights.extend(weight.to_le_bytes());
        }
        offsets.push(offsets.last().copied().unwrap_or(0) + token.len() as u32);
    }
    v1::ForwardRequest {
        request_id,
        batches: Vec::new(),
        output_dtype: v1::Dtype::F32 as i32,
        tokens: Some(v1::TokenRows {
            layer: 0,
            rows: Some(v1::WireTensor {
                dtype: dtype.to_proto() as i32,
                shape: vec![choices.len() as u64, width as u64],
                data: wire::encode_rows(hidden, width, dtype),
            }),
            offsets: offsets.iter().flat_map(|offset| offset.to_le_bytes()).collect::<Vec<u8>>().into(),
            experts: experts.into(),
            weights: weights.into(),
        }),
        sequence: 0,
    }
}

/// Each token's sum of its chosen experts' outputs (the tiny model's, computed directly on the
/// CPU), weighted by its gate weights.
fn weighted_sums(hidden: &[f32], width: usize, choices: &[&[(u32, f32)]]) -> Vec<f32> {
    let spec = tiny_model();
    let mut sums = vec![0.0f32; choices.len() * width];
    for ((row, sum), token_choices) in hidden.chunks_exact(width).zip(sums.chunks_exact_mut(width)).zip(choices) {
        for (expert, weight) in *token_choices {
            let out = Expert::synthetic(&spec, 0, *expert, tch::Device::Cpu, WeightDtype::F32).forward_f32(row);
            for (total, value) in sum.iter_mut().zip(out) {
                *total += weight * value;
            }
        }
    }
    sums
}

/// One token-major request (a token with two experts here, one with none) merged into the same
/// step as an expert-major request for one of its experts: the token-major answer is each token's
/// weighted sum over its experts, the expert-major one its own rows, both as computed directly.
#[tokio::test]
async fn a_token_major_request_comes_back_as_one_weighted_sum_per_token() {
    let worker = started(Duration::from_millis(300), 1024).await;
    let spec = tiny_model();
    let expert = |e: u32| Expert::synthetic(&spec, 0, e, tch::Device::Cpu, WeightDtype::F32);
    let hidden = rows(5, 16, 0.2);
    let choices: [&[(u32, f32)]; 5] = [&[(1, 0.6), (3, 0.4)], &[(3, 1.0)], &[], &[(0, 0.7), (1, 0.3)], &[(1, 0.5)]];
    let token_major = ForwardBatch::try_from(token_major_request(1, &hidden, 16, &choices, WireDtype::F32))
        .expect("a valid token-major request");
    assert_eq!(
        token_major.parts.iter().map(|part| (part.expert.expert, part.tokens)).collect::<Vec<_>>(),
        [(0, 1), (1, 3), (3, 2)]
    );
    let own = rows(2, 16, 0.9);
    let expert_major = expert_major(2, vec![part(0, 1, &own, 16, WireDtype::F32)]);
    let (summed, direct) = forward_together(&worker, token_major, expert_major).await;
    let (summed, direct) = (summed.expect("token-major"), direct.expect("expert-major"));

    let combined = summed.combined.expect("one sum per token");
    assert_eq!((combined.tokens, combined.width, combined.dtype), (5, 16, WireDtype::F32));
    let have = wire::decode_f32(&combined.data, combined.dtype);
    let want = weighted_sums(&hidden, 16, &choices);
    assert!(relative_error(&want, &have) < 1e-6, "{}", relative_error(&want, &have));
    assert!(have[2 * 16..3 * 16].iter().all(|value| *value == 0.0), "a token with no expert here sums to zero");
    assert!(summed.outputs.iter().all(|output| output.data.is_empty() && output.compute > Duration::ZERO));
    assert_eq!(summed.outputs[1].batch_tokens, 3 + 2, "expert 1 ran the token-major rows with the other request's");
    let have = wire::decode_f32(&direct.outputs[0].data, WireDtype::F32);
    assert!(relative_error(&expert(1).forward_f32(&own), &have) < 1e-6);
    worker.shutdown().await;
}

/// Over gRPC, a token-major answer is its sum per token and no rows per expert, with the worker's
/// stamps and time, under the id the request's metadata gives when its message carries none.
#[tokio::test]
async fn a_token_major_answer_over_grpc_carries_its_sum_stamps_and_the_metadata_s_request_id() {
    let (mut client, _stop) = grpc_worker(64).await;
    let hidden = rows(3, 16, 0.4);
    let choices: [&[(u32, f32)]; 3] = [&[(1, 0.6), (3, 0.4)], &[(3, 1.0)], &[(0, 0.5)]];
    let mut request = tonic::Request::new(token_major_request(0, &hidden, 16, &choices, WireDtype::F32));
    request.metadata_mut().insert("x-request-id", "77".parse().expect("metadata value"));
    let answer = client.forward(request).await.expect("forward").into_inner();
    assert_eq!(answer.request_id, 77);
    let combined = answer.combined.expect("one sum per token");
    assert_eq!((combined.dtype, combined.shape), (v1::Dtype::F32 as i32, vec![3, 16]));
    let have = wire::decode_f32(&combined.data, WireDtype::F32);
    let want = weighted_sums(&hidden, 16, &choices);
    assert!(relative_error(&want, &have) < 1e-6, "{}", relative_error(&want, &have));
    let experts: Vec<u32> = answer.outputs.iter().filter_map(|output| output.expert.map(|key| key.expert)).collect();
    assert_eq!(experts, [0, 1, 3]);
    assert!(answer.outputs.iter().all(|output| output.rows.is_none()), "no rows per expert");
    assert!(answer.worker_us > 0);
    assert!(0 < answer.received_unix_nanos && answer.received_unix_nanos <= answer.replied_unix_nanos);
}

/// A token-major request none of whose tokens chose an expert (or with no tokens at all) is
/// answered at once: each token's sum is zero, in the dtype asked for.
#[tokio::test]
async fn a_token_major_request_choosing_no_expert_sums_to_zero() {
    let worker = started(Duration::from_millis(300), 1024).await;
    for tokens in [0, 3] {
        let choices = vec![&[][..]; tokens];
        let hidden = rows(tokens, 16, 0.4);
        let request = token_major_request(6, &hidden, 16, &choices, WireDtype::Bf16);
        let answered = worker.forward(ForwardBatch::try_from(request).expect("valid")).await;
        let combined = answered.expect("answered").combined.expect("one sum per token");
        assert_eq!((combined.tokens, combined.width, combined.dtype), (tokens, 16, WireDtype::F32));
        assert_eq!(wire::decode_f32(&combined.data, combined.dtype), vec![0.0; tokens * 16]);
    }
    worker.shutdown().await;
}

/// Identity experts add their gate weights, not rows: each token comes back as its row times the
/// weights it gave this worker's experts (not one: the client keeps the other workers' shares),
/// also when another request's own rows share the step.
#[tokio::test]
async fn identity_experts_answer_each_token_scaled_by_its_weights_here() {
    let worker = started_with(Duration::from_millis(300), 1024, true).await;
    let hidden = rows(4, 16, 0.3);
    let choices: [&[(u32, f32)]; 4] =
        [&[(1, 0.25), (3, 0.5)], &[(3, 0.125), (0, 0.25)], &[], &[(0, 0.75), (1, 0.0625)]];
    let token_major = ForwardBatch::try_from(token_major_request(4, &hidden, 16, &choices, WireDtype::F32))
        .expect("a valid token-major request");
    let own = rows(2, 16, 0.7);
    let expert_major = expert_major(5, vec![part(0, 1, &own, 16, WireDtype::F32)]);
    let (summed, direct) = forward_together(&worker, token_major, expert_major).await;
    let combined = summed.expect("token-major").combined.expect("one sum per token");
    let have = wire::decode_f32(&combined.data, combined.dtype);
    let want: Vec<f32> = choices
        .iter()
        .zip(hidden.chunks(16))
        .flat_map(|(token_choices, row)| {
            let weight: f32 = token_choices.iter().map(|(_, weight)| weight).sum();
            row.iter().map(move |value| weight * value)
        })
        .collect();
    assert!(relative_error(&want, &have) < 1e-6, "{}", relative_error(&want, &have));
    assert_eq!(wire::decode_f32(&direct.expect("expert-major").outputs[0].data, WireDtype::F32), own);
    worker.shutdown().await;
}

/// A step hold keeps the compute thread on each step at least that long, and the answer is still
/// the identity's.
#[tokio::test]
async fn identity_steps_last_at_least_their_hold() {
    let hold = Duration::from_millis(30);
    let options =
        WorkerOptions { identity_experts: true, step_hold: hold, ..WorkerOptions::in_process(tch::Device::Cpu) };
    let worker = started_from(options, WorkerMetrics::new()).await;
    let own = rows(2, 16, 0.7);
    let batch = expert_major(9, vec![part(0, 1, &own, 16, WireDtype::F32)]);
    let started = std::time::Instant::now();
    let outcome = worker.forward(batch).await.expect("forward");
    assert!(started.elapsed() >= hold, "answered after {:?}", started.elapsed());
    let output = &outcome.outputs[0];
    assert!(output.compute >= hold, "the step's compute time counts the hold: {:?}", output.compute);
    assert_eq!(wire::decode_f32(&output.data, WireDtype::F32), own);
    worker.shutdown().await;
}

/// FP8 token rows are dequantized where they are gathered, and the sum comes back in bf16.
#[tokio::test]
async fn token_major_rows_may_travel_as_fp8() {
    let worker = started(Duration::ZERO, 1024).await;
    let spec = tiny_model();
    let hidden = rows(3, 16, 0.4);
    let choices: [&[(u32, f32)]; 3] = [&[(2, 1.0)], &[(2, 0.5), (0, 0.5)], &[(0, 1.0)]];
    let mut request = token_major_request(3, &hidden, 16, &choices, WireDtype::Fp8E4m3);
    request.output_dtype = 0;
    let outcome = worker.forward(ForwardBatch::try_from(request).expect("valid")).await.expect("forward");
    let combined = outcome.combined.expect("sum");
    assert_eq!(combined.dtype, WireDtype::Bf16, "FP8 requests are answered in bf16");
    let have = wire::decode_f32(&combined.data, combined.dtype);
    let expert = |e: u32, token: usize| {
        Expert::synthetic(&spec, 0, e, tch::Device::Cpu, WeightDtype::F32).forward_f32(&hidden[token * 16..][..16])
    };
    let mut want = expert(2, 0);
    want.extend(expert(2, 1).iter().zip(expert(0, 1)).map(|(a, b)| 0.5 * a + 0.5 * b));
    want.extend(expert(0, 2));
    let error = relative_error(&want, &have);
    assert!(error > 1e-4 && error < 5e-2, "e4m3 rows, bf16 sums: {error}");
    worker.shutdown().await;
}

/// Every answer's bytes of `outcomes`, in order.
fn answer_bytes(outcomes: [&ForwardOutcome; 2]) -> Vec<Bytes> {
    outcomes
        .into_iter()
        .flat_map(|outcome| {
            let combined = outcome.combined.iter().map(|combined| combined.data.clone());
            outcome.outputs.iter().map(|output| output.data.clone()).chain(combined)
        })
        .collect()
}

/// A step's worth of mixed work: a token-major request (a token with two experts, one with none)
/// and an expert-major one with f32 rows for expert 1 and bf16 rows for expert 3, answered in f16.
struct MixedStep {
    hidden: Vec<f32>,
    choices: [&'static [(u32, f32)]; 5],
    own: [Vec<f32>; 2],
}

impl MixedStep {
    fn new() -> Self {
        let choices: [&[(u32, f32)]; 5] = [&[(1, 0.6), (3, 0.4)], &[(3, 1.0)], &[], &[(0, 0.7), (1, 0.3)], &[(1, 0.5)]];
        Self { hidden: rows(5, 16, 0.3), choices, own: [rows(3, 16, 0.1), rows(4, 16, 0.4)] }
    }

    /// The two requests through `worker` in one step: every answer's bytes, the expert-major
    /// request's rows first and the token-major request's sum last.
    async fn through(&self, worker: &ExpertWorker) -> Vec<Bytes> {
        let Self { hidden, choices, own: [a1, a3] } = self;
        let token_major = ForwardBatch::try_from(token_major_request(1, hidden, 16, choices, WireDtype::F32))
            .expect("a valid token-major request");
        let own = vec![part(0, 1, a1, 16, WireDtype::F32), part(1, 3, a3, 16, WireDtype::Bf16)];
        let expert_major = ForwardBatch { output_dtype: Some(WireDtype::F16), ..expert_major(2, own) };
        let (own, summed) = forward_together(worker, expert_major, token_major).await;
        answer_bytes([&own.expect("expert-major"), &summed.expect("token-major")])
    }
}

/// With `--grouped-experts` the tiny model's experts are one stack: an expert-major and a
/// token-major request merged into one step come back bit for bit as from a worker computing
/// expert after expert (on a CPU libtorch's grouped product loops over the experts' products
/// itself), their three experts' batches counted as grouped; so again after an expert is
/// unloaded and the layer restacked, with f32 rows and with bf16 ones.
#[tokio::test]
async fn grouped_experts_answer_bit_for_bit_as_experts_computed_one_by_one() {
    let start = |grouped_experts: bool| {
        let options = WorkerOptions {
            batching: BatchingConfig { batch_wait: Duration::from_millis(300), max_batch_tokens: 1024 },
            default_queue_limit_tokens: 1024,
            grouped_experts,
            ..WorkerOptions::in_process(tch::Device::Cpu)
        };
        let metrics = WorkerMetrics::new();
        async move { (started_from(options, metrics.clone()).await, metrics) }
    };
    let ((one_by_one, plain_metrics), (grouped, grouped_metrics)) = tokio::join!(start(false), start(true));
    let mixed = MixedStep::new();
    let mut answers = Vec::new();
    for worker in [&one_by_one, &grouped] {
        answers.push(mixed.through(worker).await);
    }
    assert_eq!(answers[0], answers[1]);
    let want = weighted_sums(&mixed.hidden, 16, &mixed.choices);
    let have = wire::decode_f32(answers[1].last().expect("the sum is the last answer"), WireDtype::F32);
    assert!(relative_error(&want, &have) < 1e-6, "{}", relative_error(&want, &have));
    assert_eq!((plain_metrics.grouped_batches.get(), grouped_metrics.grouped_batches.get()), (0, 3), "experts 0, 1, 3");

    let unloaded = [ExpertId::new(0, 1)];
    for worker in [&one_by_one, &grouped] {
        assert_eq!(worker.unload_experts(unloaded.to_vec()).await.expect("unloaded"), unloaded);
    }
    let choices: [&[(u32, f32)]; 3] = [&[(0, 0.5), (3, 0.5)], &[(2, 1.0)], &[(2, 0.75), (3, 0.25)]];
    let hidden = rows(3, 16, 0.7);
    let sums_of = |dtype: WireDtype| {
        let (one_by_one, grouped, hidden) = (&one_by_one, &grouped, &hidden);
        async move {
            let mut sums = Vec::new();
            for worker in [one_by_one, grouped] {
                let request = ForwardBatch::try_from(token_major_request(3, hidden, 16, &choices, dtype))
                    .expect("a valid token-major request");
                let outcome = worker.forward(request).await.expect("token-major");
                sums.push(outcome.combined.expect("one sum per token"));
            }
            assert_eq!(sums[0].data, sums[1].data, "{dtype:?} rows");
            wire::decode_f32(&sums[1].data, sums[1].dtype)
        }
    };
    let want = weighted_sums(&hidden, 16, &choices);
    assert!(relative_error(&want, &sums_of(WireDtype::F32).await) < 1e-6);
    assert_eq!(grouped_metrics.grouped_batches.get(), 3 + 3, "experts 0, 2, 3 of the restacked layer");
    // bf16 rows into f32 experts: converted where they are selected into the joined rows.
    assert!(relative_error(&want, &sums_of(WireDtype::Bf16).await) < 1e-2);
    assert_eq!(grouped_metrics.grouped_batches.get(), 3 + 3 + 3);
    for worker in [one_by_one, grouped] {
        worker.shutdown().await;
    }
}

/// A worker that moves its steps' rows and answers as a GPU does (one upload carrying the rows,
/// the token-major parts' indices and weights and the grouped products' row ends; one download of
/// every answer) answers bit for bit as one that moves them in place: for experts computed one by
/// one, grouped, and identity experts; for a step of mixed expert-major and token-major work, and
/// for token-major rows in bf16 and FP8.
#[tokio::test]
async fn copied_transfers_answer_bit_for_bit_as_in_place() {
    let hidden = rows(3, 16, 0.7);
    let choices: [&[(u32, f32)]; 3] = [&[(0, 0.5), (3, 0.5)], &[(2, 1.0)], &[(2, 0.75), (1, 0.25)]];
    for (grouped_experts, identity_experts) in [(false, false), (true, false), (false, true)] {
        let start = |copied_transfers_on_cpu: bool| {
            let options = WorkerOptions {
                batching: BatchingConfig { batch_wait: Duration::from_millis(300), max_batch_tokens: 1024 },
                default_queue_limit_tokens: 1024,
                grouped_experts,
                identity_experts,
                copied_transfers_on_cpu,
                ..WorkerOptions::in_process(tch::Device::Cpu)
            };
            started_from(options, WorkerMetrics::new())
        };
        let (in_place, copied) = tokio::join!(start(false), start(true));
        let mut answers = Vec::new();
        for worker in [&in_place, &copied] {
            let mut bytes = MixedStep::new().through(worker).await;
            for dtype in [WireDtype::Bf16, WireDtype::Fp8E4m3] {
                let request = ForwardBatch::try_from(token_major_request(3, &hidden, 16, &choices, dtype))
                    .expect("a valid token-major request");
                bytes.push(worker.forward(request).await.expect("token-major").combined.expect("a sum").data);
            }
            answers.push(bytes);
        }
        let case = format!("grouped {grouped_experts}, identity {identity_experts}");
        assert_eq!(answers[0].len(), 8, "{case}: 2 expert-major answers, 3 empty parts, 3 sums");
        assert_eq!(answers[0], answers[1], "{case}");
        for worker in [in_place, copied] {
            worker.shutdown().await;
        }
    }
}

/// An expert unloaded while a token-major request's part for it waits in its queue computes that
/// part in a step of its own, which finishes no sum (on a GPU: nothing to download); the request's
/// other part finishes the sum in a later step, and the answer is the weighted sum over both
/// experts, whether the worker moves its rows in place or copies them.
#[tokio::test]
async fn a_part_computed_apart_by_an_unload_still_joins_its_sum() {
    let hidden = rows(3, 16, 0.5);
    let choices: [&[(u32, f32)]; 3] = [&[(1, 0.75), (3, 0.25)], &[(1, 1.0)], &[(3, 0.5)]];
    let want = weighted_sums(&hidden, 16, &choices);
    for copied_transfers_on_cpu in [false, true] {
        let options = WorkerOptions {
            batching: BatchingConfig { batch_wait: Duration::from_secs(30), max_batch_tokens: 1024 },
            default_queue_limit_tokens: 1024,
            copied_transfers_on_cpu,
            ..WorkerOptions::in_process(tch::Device::Cpu)
        };
        let worker = started_from(options, WorkerMetrics::new()).await;
        // Another request announced and not yet in: the queued rows wait for it.
        let on_its_way = worker.announce();
        let request = ForwardBatch::try_from(token_major_request(7, &hidden, 16, &choices, WireDtype::F32))
            .expect("a valid token-major request");
        let answering = tokio::spawn({
            let worker = worker.clone();
            async move { worker.forward(request).await }
        });
        while worker.queued_tokens() < 4 {
            assert!(!answering.is_finished(), "the request ended before its rows were queued");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let unloaded = [ExpertId::new(0, 1)];
        assert_eq!(worker.unload_experts(unloaded.to_vec()).await.expect("unloaded"), unloaded);
        assert_eq!(worker.queued_tokens(), 2, "expert 3's part still waits");
        drop(on_its_way);
        let outcome = answering.await.expect("joined").expect("answered");
        let combined = outcome.combined.expect("one sum per token");
        let have = wire::decode_f32(&combined.data, combined.dtype);
        let error = relative_error(&want, &have);
        assert!(error < 1e-6, "copied {copied_transfers_on_cpu}: {error}");
        worker.shutdown().await;
    }
}

/// What a step uploads: a token-major request's rows once, however many of its experts run, and
/// where the rows are copied (as on a GPU) each part's token indices (8 bytes a row) and gate
/// weights (4 bytes a row) too, each run aligned to 16 bytes; identity experts' rows, in place,
/// are read from the request's bytes and not uploaded at all.
#[tokio::test]
async fn a_step_uploads_a_token_major_request_s_rows_once_and_copied_its_index_runs() {
    let hidden = rows(3, 16, 0.3);
    // Parts: expert 0 one row, expert 1 one, expert 2 two, expert 3 one.
    let choices: [&[(u32, f32)]; 3] = [&[(0, 0.5), (3, 0.5)], &[(2, 1.0)], &[(2, 0.75), (1, 0.25)]];
    let rows_bytes = 3 * 16 * 4;
    let index_runs = |rows: usize| (rows * 8).next_multiple_of(ALIGN) + (rows * 4).next_multiple_of(ALIGN);
    let parts_index_runs = index_runs(1) + index_runs(1) + index_runs(2) + index_runs(1);
    for (identity_experts, copied_transfers_on_cpu, want) in [
        (false, false, rows_bytes),
        (false, true, rows_bytes + parts_index_runs),
        (true, false, 0),
        (true, true, rows_bytes),
    ] {
        let metrics = WorkerMetrics::new();
        let options = WorkerOptions {
            identity_experts,
            copied_transfers_on_cpu,
            default_queue_limit_tokens: 1024,
            ..WorkerOptions::in_process(tch::Device::Cpu)
        };
        let worker = started_from(options, metrics.clone()).await;
        let request = ForwardBatch::try_from(token_major_request(5, &hidden, 16, &choices, WireDtype::F32))
            .expect("a valid token-major request");
        let answer = worker.forward(request).await.expect("token-major");
        assert!(answer.combined.is_some(), "one sum per token");
        let case = format!("identity {identity_experts}, copied {copied_transfers_on_cpu}");
        assert_eq!(metrics.staged_bytes.get(), want as u64, "{case}");
        worker.shutdown().await;
    }
}

/// Rows of one dtype that a step merges for an expert are packed as one run of its upload: two
/// requests' FP8 rows (20 bytes each: 16 codes and a block scale) take 40 bytes, aligned to 48,
/// where as two runs they would take 32 each.
#[tokio::test]
async fn rows_of_one_dtype_merged_into_a_step_are_uploaded_as_one_run() {
    let metrics = WorkerMetrics::new();
    let options = WorkerOptions {
        batching: BatchingConfig { batch_wait: Duration::from_millis(300), max_batch_tokens: 1024 },
        default_queue_limit_tokens: 1024,
        ..WorkerOptions::in_process(tch::Device::Cpu)
    };
    let worker = started_from(options, metrics.clone()).await;
    let fp8_row = |request_id: u64| ForwardBatch {
        output_dtype: Some(WireDtype::Bf16),
        ..expert_major(request_id, vec![part(0, 1, &rows(1, 16, request_id as f32), 16, WireDtype::Fp8E4m3)])
    };
    let (first, second) = forward_together(&worker, fp8_row(1), fp8_row(2)).await;
    let batch_tokens =
        |outcome: Result<ForwardOutcome, WorkerError>| outcome.expect("fp8 rows answered").outputs[0].batch_tokens;
    assert_eq!((batch_tokens(first), batch_tokens(second)), (2, 2), "one batch of both requests' rows");
    let one_run = (2 * WireDtype::Fp8E4m3.row_bytes(16)).next_multiple_of(ALIGN);
    assert_eq!(one_run, 48);
    assert_eq!(metrics.staged_bytes.get(), one_run as u64);
    worker.shutdown().await;
}
