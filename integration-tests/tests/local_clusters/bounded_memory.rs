//! A worker's memory under hostile load stays bounded by its limits, measured on the process:
//! eight concurrent invalid 48 MiB requests on one connection are held to the receiving budget
//! plus the connection's flow-control window (not 384 MiB at once; those that cannot get room within a second are refused,
//! so the waiting ones cannot starve the admitted one of flow-control window), and a `ForwardStream` whose answers are never read stops growing the worker
//! (it went from 115 to 3,124 MiB that way). The worker serves normally afterwards.

use std::time::Duration;

use bytes::Bytes;
use switchyard_common::children::ChildProcess;
use switchyard_integration_tests::{TestCluster, hidden_states, small_model};
use switchyard_proto::v1::{self, expert_worker_client::ExpertWorkerClient};
use switchyard_proto::wire::{self, WireDtype};
use tonic::Code;

const MIB: u64 = 1 << 20;
/// The worker's `--max-receiving-bytes` here.
const BUDGET: u64 = 64 * MIB;

/// `work`'s output and the highest RSS `process` had while it ran, sampled every 10 ms.
async fn with_peak_rss<T>(process: &ChildProcess, work: impl Future<Output = T>) -> (T, u64) {
    let mut peak = process.rss_bytes().unwrap_or(0);
    let mut work = std::pin::pin!(work);
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            output = &mut work => return (output, peak.max(process.rss_bytes().unwrap_or(0))),
            _ = ticker.tick() => peak = peak.max(process.rss_bytes().unwrap_or(0)),
        }
    }
}

fn request(rows: u64, data: Bytes) -> v1::ForwardRequest {
    v1::ForwardRequest {
        request_id: 1,
        batches: vec![v1::ExpertRows {
            expert: Some(v1::ExpertKey::new(0, 0)),
            rows: Some(v1::WireTensor { dtype: v1::Dtype::F32 as i32, shape: vec![rows, 256], data }),
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn hostile_load_leaves_a_worker_within_its_memory_bounds() {
    let cluster = TestCluster::start(small_model(2.0), 1, |config| {
        config.worker_args.extend(["--max-receiving-bytes".to_owned(), BUDGET.to_string()]);
    })
    .await;
    cluster.client.forward(0, &hidden_states(64, 256, 3)).await.expect("warm");
    let worker = &cluster.processes.workers[0];
    let baseline = worker.rss_bytes().expect("the worker's RSS");
    let channel = switchyard_common::transport::channel(&worker.grpc_uri()).expect("channel");
    let client = ExpertWorkerClient::new(channel);

    // Eight invalid 48 MiB requests at once (the rows' bytes 4 short): each is read whole before
    // it can be refused, so without the budget all eight would be held together.
    let rows = 48 * MIB / 1024;
    let invalid = Bytes::from(vec![0u8; (rows * 1024 - 4) as usize]);
    let attack = futures::future::join_all((0..8).map(|_| {
        let (mut client, request) = (client.clone(), request(rows, invalid.clone()));
        async move { client.forward(request).await }
    }));
    // A guard against a hang, not a measurement.
    let attack = tokio::time::timeout(Duration::from_secs(120), attack);
    let (answers, peak) = with_peak_rss(worker, attack).await;
    let codes: Vec<Code> =
        answers.expect("every request answered").into_iter().map(|a| a.unwrap_err().code()).collect();
    assert!(codes.iter().all(|code| [Code::InvalidArgument, Code::ResourceExhausted].contains(code)), "{codes:?}");
    assert!(codes.contains(&Code::InvalidArgument), "some were read and found invalid: {codes:?}");
    let grown = peak.saturating_sub(baseline);
    // The budget; the bytes of waiting requests in the connection's HTTP/2 window, which the
    // sender may fill before they are read; the decoding of the message being read (its buffer
    // and its rows); and the frames of the message read before it, freed but kept resident for
    // the next reads (the worker keeps freed buffers, `switchyard_common::freed_buffers`, until
    // they are reused or its trimmer returns them: 239 MiB was seen once under the full suite,
    // 176-208 MiB alone with either allocator setting). All eight at once would be 384 MiB before
    // any decoding.
    let window = u64::from(switchyard_common::transport::CONNECTION_WINDOW_BYTES);
    let bound = BUDGET + window + 2 * 48 * MIB + 48 * MIB;
    assert!(grown < bound, "8 invalid 48 MiB requests grew the worker by {} MiB (bound {})", grown / MIB, bound / MIB);
    eprintln!("8 x 48 MiB invalid requests: worker RSS {} -> {} MiB at most", baseline / MIB, peak / MIB);

    // A stream of 20,000 requests whose answers are never read.
    let chunk = request(4, wire::encode_f32(&[0.25f32; 4 * 256], WireDtype::F32));
    let requests =
        futures::stream::iter((0..20_000u64).map(move |id| v1::ForwardRequest { request_id: id, ..chunk.clone() }));
    let mut streaming = client.clone();
    let stream = async {
        let unread = streaming.forward_stream(requests).await.expect("stream");
        tokio::time::sleep(Duration::from_secs(3)).await;
        unread
    };
    let (_unread, peak) = with_peak_rss(worker, stream).await;
    let grown = peak.saturating_sub(baseline);
    assert!(grown < 256 * MIB, "a never-read stream of 20,000 requests grew the worker by {} MiB", grown / MIB);
    eprintln!("a never-read stream: worker RSS {} -> {} MiB at most", baseline / MIB, peak / MIB);

    cluster.client.forward(0, &hidden_states(64, 256, 4)).await.expect("the worker still serves");
}
