//! What the in-process tests share: real workers on the CPU, routing tables over them, and a
//! transport to them that keeps request ids and can leave one worker stalled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use switchyard_expert_worker::metrics::WorkerMetrics;
use switchyard_expert_worker::scheduler::BatchingConfig;
use switchyard_expert_worker::{ExpertWorker, ExpertWorkerService, QueueLimits, WorkerOptions};
use switchyard_model::{ExpertId, ModelSpec};
use switchyard_proto::v1;
use switchyard_reference::in_process::InProcessTransport;
use switchyard_router_client::transport::Answer;
use switchyard_router_client::{ClientError, Endpoint, ExpertTransport, RoutingTableView};

/// A one-thread CPU worker holding `experts` of `model`, each behind a queue of `limit` tokens,
/// whose batcher holds queued rows up to `batch_wait` while another request is on its way in.
pub async fn cpu_worker(
    model: ModelSpec,
    experts: Vec<ExpertId>,
    limit: usize,
    batch_wait: Duration,
) -> Arc<ExpertWorker> {
    let options = WorkerOptions {
        batching: BatchingConfig { batch_wait, max_batch_tokens: 1 << 20 },
        default_queue_limit_tokens: limit,
        ..WorkerOptions::in_process(tch::Device::Cpu)
    };
    let worker = ExpertWorker::start(options, WorkerMetrics::new()).expect("compute thread");
    worker.load_experts(model, experts, QueueLimits::default()).await.expect("load");
    worker
}

/// One in-process worker, "a", holding every expert of `model`'s layer 0 (8) with room for any
/// call, and the transport that reaches it.
pub async fn every_expert_on_a(model: &ModelSpec) -> (Arc<InProcessTransport>, Arc<ExpertWorker>) {
    let every_expert = (0..8).map(|expert| ExpertId::new(0, expert)).collect();
    let worker = cpu_worker(model.clone(), every_expert, 1 << 20, Duration::ZERO).await;
    let transport =
        Arc::new(InProcessTransport::new([(Arc::from("a"), ExpertWorkerService::new(worker.clone(), "a"))]));
    (transport, worker)
}

/// A routing table of `model`'s layer 0 (8 experts) at `version`, whose expert `e` is served by
/// `holders(e)`.
pub fn table(model: &ModelSpec, version: u64, holders: impl Fn(u32) -> Vec<&'static str>) -> Arc<RoutingTableView> {
    let routes = (0..8)
        .map(|expert| v1::ExpertRoute {
            expert: Some(v1::ExpertKey::new(0, expert)),
            endpoints: holders(expert).into_iter().map(String::from).collect(),
        })
        .collect();
    let table = v1::RoutingTable {
        version,
        epoch: 1,
        model: Some(model.to_proto()),
        routes,
        queue_limit_tokens: 1 << 20,
        max_batch_tokens: 1 << 20,
    };
    Arc::new(RoutingTableView::try_from(table).expect("valid table"))
}

/// Two in-process workers holding every expert of `model`: "a" with room and "tiny", whose
/// one-token queues refuse every call; and a table routing even experts to "a", odd ones to "tiny".
pub async fn roomy_and_full(
    model: &ModelSpec,
) -> (Arc<InProcessTransport>, Arc<RoutingTableView>, [Arc<ExpertWorker>; 2]) {
    let every_expert = || (0..8).map(|expert| ExpertId::new(0, expert)).collect();
    let served = cpu_worker(model.clone(), every_expert(), 1 << 20, Duration::ZERO).await;
    let tiny = cpu_worker(model.clone(), every_expert(), 1, Duration::ZERO).await;
    let transport = InProcessTransport::new([
        (Arc::from("a"), ExpertWorkerService::new(served.clone(), "a")),
        (Arc::from("tiny"), ExpertWorkerService::new(tiny.clone(), "tiny")),
    ]);
    let even_odd = table(model, 1, |expert| vec![if expert % 2 == 0 { "a" } else { "tiny" }]);
    (Arc::new(transport), even_odd, [served, tiny])
}

/// In-process workers as the client reaches them, watched: every request's id is kept, and the
/// gRPC message bytes each worker was sent and answered; `stalled` (if named) takes its requests
/// and never answers, as a hung worker would.
#[derive(Debug)]
pub struct Observed {
    workers: InProcessTransport,
    stalled: Option<&'static str>,
    request_ids: Mutex<Vec<u64>>,
    message_bytes: Arc<Mutex<HashMap<Endpoint, MessageBytes>>>,
}

/// gRPC message bytes one way and the other, each message with its 5-byte length prefix (a
/// compression flag and a 4-byte length, gRPC's framing over HTTP/2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageBytes {
    pub sent: u64,
    pub answered: u64,
}

fn framed_len(message: &impl prost::Message) -> u64 {
    message.encoded_len() as u64 + 5
}

fn count_message_bytes(counts: &Mutex<HashMap<Endpoint, MessageBytes>>, endpoint: &Endpoint, more: MessageBytes) {
    let mut counts = counts.lock().expect("no test panicked holding it");
    let bytes = counts.entry(endpoint.clone()).or_default();
    bytes.sent += more.sent;
    bytes.answered += more.answered;
}

impl Observed {
    pub fn new(workers: InProcessTransport, stalled: Option<&'static str>) -> Self {
        Self { workers, stalled, request_ids: Mutex::default(), message_bytes: Arc::default() }
    }

    /// The ids of every request sent so far, in the order they were sent.
    pub fn request_ids(&self) -> Vec<u64> {
        self.request_ids.lock().expect("no test panicked holding it").clone()
    }

    /// Each worker's message bytes since the last time they were taken.
    pub fn take_message_bytes(&self) -> HashMap<Endpoint, MessageBytes> {
        std::mem::take(&mut *self.message_bytes.lock().expect("no test panicked holding it"))
    }
}

impl ExpertTransport for Observed {
    fn forward(
        &self,
        endpoint: &Endpoint,
        request: v1::ForwardRequest,
        deadline: Duration,
    ) -> BoxFuture<'static, Result<Answer, ClientError>> {
        self.request_ids.lock().expect("no test panicked holding it").push(request.request_id);
        count_message_bytes(&self.message_bytes, endpoint, MessageBytes { sent: framed_len(&request), answered: 0 });
        if self.stalled == Some(&**endpoint) {
            return Box::pin(std::future::pending());
        }
        let answer = self.workers.forward(endpoint, request, deadline);
        let (counts, endpoint) = (self.message_bytes.clone(), endpoint.clone());
        Box::pin(async move {
            let answer = answer.await;
            if let Ok(answer) = &answer {
                count_message_bytes(
                    &counts,
                    &endpoint,
                    MessageBytes { sent: 0, answered: framed_len(&answer.response) },
                );
            }
            answer
        })
    }
}
