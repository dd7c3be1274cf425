//! The gRPC adapter: decode and validate, open the span, call [`ExpertWorker`], encode. No logic.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use switchyard_common::otlp::RemoteParent;
use switchyard_model::{ExpertId, ModelSpec};
use switchyard_proto::payload_last::PayloadLast;
use switchyard_proto::v1::{self, expert_worker_server};
use switchyard_proto::zero_copy;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::compute::micros;
use crate::error::WorkerError;
use crate::intake::{Intake, Share};
use crate::request::ForwardBatch;
use crate::scheduler::Arrival;
use crate::worker::{ExpertWorker, ForwardOutcome, QueueLimits};

/// Metadata key carrying the client's request id across the hop, for tracing.
pub const REQUEST_ID_METADATA: &str = "x-request-id";

#[derive(Debug, Clone)]
pub struct ExpertWorkerService {
    worker: Arc<ExpertWorker>,
    /// This worker's name, recorded on every span.
    name: Arc<str>,
}

impl ExpertWorkerService {
    pub fn new(worker: Arc<ExpertWorker>, name: impl Into<Arc<str>>) -> Self {
        Self { worker, name: name.into() }
    }

    /// The gRPC server of this service, `Forward` answering without copying its rows and receiving
    /// within `intake`.
    pub fn into_server(self, intake: Intake) -> WorkerServer {
        let generated = expert_worker_server::ExpertWorkerServer::new(self.clone())
            .max_decoding_message_size(switchyard_common::transport::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(switchyard_common::transport::MAX_MESSAGE_BYTES);
        WorkerServer { service: self, generated, intake }
    }

    /// One forward request, decoded and validated, run, encoded: what `Forward` serves, callable
    /// without a network (the reference layer's in-process transport). Its span joins `caller`'s
    /// trace.
    pub async fn forward_message(
        &self,
        request: v1::ForwardRequest,
        caller: &RemoteParent,
        arrival: Option<Arrival>,
    ) -> Result<v1::ForwardResponse, WorkerError> {
        let received_unix_nanos = switchyard_common::clock::unix_nanos();
        let sequence = request.sequence;
        let layer = match &request.tokens {
            Some(tokens) => Some(tokens.layer),
            None => request.batches.first().and_then(|part| part.expert).map(|key| key.layer),
        };
        let span = tracing::info_span!("forward", request_id = request.request_id, layer, worker = %self.name);
        caller.adopt(&span);
        panic_as_error(async {
            let batch = ForwardBatch::try_from(request)?;
            let rows = batch.total_tokens();
            let outcome = self.worker.forward_arrived(batch, arrival).await.inspect_err(|error| {
                tracing::debug!(%error, "forward refused");
            })?;
            tracing::debug!(rows, handler_us = micros(outcome.handler_time), "forward answered");
            let mut response = encode_outcome(outcome);
            response.received_unix_nanos = received_unix_nanos;
            response.sequence = sequence;
            response.replied_unix_nanos = switchyard_common::clock::unix_nanos();
            Ok(response)
        })
        .instrument(span)
        .await
    }
}

/// Runs one request's handling, a panic in it (a bug) becoming an error that says so: the caller
/// gets INTERNAL with the panic's message, not a reset stream that its client could take for a
/// network failure and send to the next holder, and the worker logs it. Unwinding drops what the
/// request held, as a cancelled request does, and the worker's locks are taken even once
/// poisoned, so it goes on serving.
async fn panic_as_error<T>(handling: impl Future<Output = Result<T, WorkerError>>) -> Result<T, WorkerError> {
    AssertUnwindSafe(handling).catch_unwind().await.unwrap_or_else(|panic| {
        let reason = switchyard_common::panic::message(&*panic, "a panic");
        tracing::error!(%reason, "handling a forward request panicked");
        Err(WorkerError::Panicked(reason))
    })
}

fn encode_outcome(outcome: ForwardOutcome) -> v1::ForwardResponse {
    let token_major = outcome.combined.is_some();
    v1::ForwardResponse {
        request_id: outcome.request_id,
        combined: outcome.combined.map(|combined| v1::WireTensor {
            dtype: combined.dtype.to_proto() as i32,
            shape: vec![combined.tokens as u64, combined.width as u64],
            data: combined.data,
        }),
        outputs: outcome
            .outputs
            .into_iter()
            .map(|rows| v1::ExpertOutput {
                expert: Some(rows.expert.into()),
                rows: (!token_major).then(|| v1::WireTensor {
                    dtype: rows.dtype.to_proto() as i32,
                    shape: vec![rows.tokens as u64, rows.width as u64],
                    data: rows.data,
                }),
                timing: Some(v1::ExpertTiming {
                    queue_wait_us: micros(rows.queue_wait),
                    compute_us: micros(rows.compute),
                    batch_tokens: rows.batch_tokens as u32,
                    tokens: rows.tokens as u32,
                }),
            })
            .collect(),
        worker_us: micros(outcome.handler_time),
        ..Default::default()
    }
}

/// Uses the metadata request id when the message carries none.
fn with_request_id<T>(request: &Request<T>, id_in_message: u64) -> u64 {
    if id_in_message != 0 {
        return id_in_message;
    }
    request
        .metadata()
        .get(REQUEST_ID_METADATA)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// `ExpertWorker`'s server: `Forward` and `ForwardStream` go through [`zero_copy`]'s server, so
/// their requests' rows are slices of the frames they came in and their answers' rows reach the
/// socket as the `Bytes` the compute thread filled (tonic's generated server would copy each into
/// one buffer first); every other method is the generated server's.
#[derive(Debug, Clone)]
pub struct WorkerServer {
    service: ExpertWorkerService,
    generated: expert_worker_server::ExpertWorkerServer<ExpertWorkerService>,
    intake: Intake,
}

impl NamedService for WorkerServer {
    const NAME: &'static str = <expert_worker_server::ExpertWorkerServer<ExpertWorkerService> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for WorkerServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let share = Share::default();
        if request.uri().path() == switchyard_proto::FORWARD_STREAM_PATH {
            let service = self.service.clone();
            let request = request.map(|body| Body::new(self.intake.meter(body, share.clone())));
            return Box::pin(async move {
                // Each message's share goes back as it is answered.
                let answer_each = |request: Request<zero_copy::Requests<v1::ForwardRequest>>| async move {
                    // Each answer's sum ends its message: the client has it once the sum is in.
                    let answers = service.answer_each(request, share).map(|answer| answer.map(PayloadLast));
                    Ok(Response::new(answers))
                };
                Ok(zero_copy::serve_streaming(request, switchyard_common::transport::MAX_MESSAGE_BYTES, answer_each)
                    .await)
            });
        }
        if request.uri().path() != switchyard_proto::FORWARD_PATH {
            return self.generated.call(request);
        }
        let service = self.service.clone();
        // From its headers on, rows queued before it wait for this request (up to the batch wait).
        let arrival = service.worker.announce();
        let request = request.map(|body| Body::new(self.intake.meter(body, share.clone())));
        Box::pin(async move {
            let forward = |request| async move { service.forward_request(request, Some(arrival)).await };
            let answer =
                zero_copy::serve_unary(request, switchyard_common::transport::MAX_MESSAGE_BYTES, forward).await;
            // The request's rows were held until it was answered.
            drop(share);
            Ok(answer)
        })
    }
}

/// Requests of one `ForwardStream` admitted and not yet answered, at most.
const STREAM_IN_FLIGHT: usize = 64;

type ForwardResponseStream = Pin<Box<dyn Stream<Item = Result<v1::ForwardResponse, Status>> + Send>>;

impl ExpertWorkerService {
    /// `Forward`, for a request announced as `arrival` when it was (by [`WorkerServer`]).
    async fn forward_request(
        &self,
        request: Request<v1::ForwardRequest>,
        arrival: Option<Arrival>,
    ) -> Result<Response<v1::ForwardResponse>, Status> {
        let request_id = with_request_id(&request, request.get_ref().request_id);
        let caller = RemoteParent::from_metadata(request.metadata());
        let mut message = request.into_inner();
        message.request_id = request_id;
        Ok(Response::new(self.forward_message(message, &caller, arrival).await?))
    }

    /// `ForwardStream`'s answers: each request of `request`'s stream runs concurrently and is
    /// answered as it finishes, a failure as an `error` on that answer so the stream lives on; each
    /// answer gives back one message's share of the receiving budget (`shares`, from
    /// [`WorkerServer`]).
    fn answer_each<S>(&self, request: Request<S>, shares: Share) -> ForwardResponseStream
    where
        S: Stream<Item = Result<v1::ForwardRequest, Status>> + Send + Unpin + 'static,
    {
        // The stream's chunks are one call's: they join the trace that opened it.
        let caller = RemoteParent::from_metadata(request.metadata());
        let mut incoming = request.into_inner();
        let (answers, receiver) = mpsc::channel(STREAM_IN_FLIGHT);
        // A request holds a permit until its answer is queued for the client: a client that stops
        // reading stops the stream from taking more requests, instead of growing the worker.
        let permits = Arc::new(tokio::sync::Semaphore::new(STREAM_IN_FLIGHT));
        let service = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                let Some(message) = incoming.next().await else { break };
                let message = match message {
                    Ok(message) => message,
                    Err(status) => {
                        let _ = answers.send(Err(status)).await;
                        break;
                    }
                };
                let (service, answers, shares, caller) =
                    (service.clone(), answers.clone(), shares.clone(), caller.clone());
                tokio::spawn(async move {
                    let (request_id, sequence) = (message.request_id, message.sequence);
                    let answer = service.forward_message(message, &caller, None).await.unwrap_or_else(|error| {
                        let status = Status::from(error);
                        v1::ForwardResponse {
                            request_id,
                            sequence,
                            error: Some(v1::RequestError {
                                code: status.code() as i32,
                                message: status.message().to_owned(),
                                details: status.details().to_vec(),
                            }),
                            ..Default::default()
                        }
                    });
                    let _ = answers.send(Ok(answer)).await;
                    shares.release_oldest();
                    drop(permit);
                });
            }
        });
        Box::pin(ReceiverStream::new(receiver))
    }
}

#[tonic::async_trait]
impl expert_worker_server::ExpertWorker for ExpertWorkerService {
    async fn forward(&self, request: Request<v1::ForwardRequest>) -> Result<Response<v1::ForwardResponse>, Status> {
        self.forward_request(request, None).await
    }

    type ForwardStreamStream = ForwardResponseStream;

    /// Each request on the stream runs concurrently (`ExpertWorkerService::answer_each`).
    async fn forward_stream(
        &self,
        request: Request<Streaming<v1::ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        Ok(Response::new(self.answer_each(request, Share::default())))
    }

    async fn load_experts(
        &self,
        request: Request<v1::LoadExpertsRequest>,
    ) -> Result<Response<v1::LoadExpertsResponse>, Status> {
        let request = request.into_inner();
        let spec = ModelSpec::try_from(request.model).map_err(|error| Status::invalid_argument(error.to_string()))?;
        let limit = |tokens: u32| (tokens > 0).then_some(tokens as usize);
        let limit =
            QueueLimits { routed: limit(request.queue_limit_tokens), shared: limit(request.shared_queue_limit_tokens) };
        let span = tracing::info_span!("load_experts", worker = %self.name, experts = request.experts.len());
        let experts = request.experts.into_iter().map(ExpertId::from).collect();
        let loaded = self.worker.load_experts(spec, experts, limit).instrument(span).await?;
        let loaded = loaded.into_iter().map(Into::into).collect();
        Ok(Response::new(v1::LoadExpertsResponse { loaded, resident_bytes: self.worker.resident_bytes() }))
    }

    async fn unload_experts(
        &self,
        request: Request<v1::UnloadExpertsRequest>,
    ) -> Result<Response<v1::UnloadExpertsResponse>, Status> {
        let experts = request.into_inner().experts.into_iter().map(ExpertId::from).collect();
        let unloaded = self.worker.unload_experts(experts).await?;
        Ok(Response::new(v1::UnloadExpertsResponse { unloaded: unloaded.into_iter().map(Into::into).collect() }))
    }

    async fn get_stats(&self, _request: Request<v1::GetStatsRequest>) -> Result<Response<v1::WorkerStats>, Status> {
        Ok(Response::new(v1::WorkerStats {
            device: switchyard_experts::device::device_name(self.worker.device()),
            experts: expert_stats(&self.worker),
            resident_bytes: self.worker.resident_bytes(),
        }))
    }
}

/// Each expert queue's figures, as stats answer them and heartbeats carry them.
pub fn expert_stats(worker: &ExpertWorker) -> Vec<v1::ExpertStats> {
    worker
        .queues()
        .into_iter()
        .map(|queue| v1::ExpertStats {
            expert: Some(queue.expert.into()),
            queued_tokens: queue.queued_tokens as u64,
            queue_limit_tokens: queue.limit_tokens as u32,
            admitted_tokens: queue.counters.admitted_tokens,
            rejected_tokens: queue.counters.rejected_tokens,
            batches: queue.counters.batches,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_handling_a_request_is_an_internal_error_that_names_it() {
        assert_eq!(panic_as_error(async { Ok::<_, WorkerError>(7) }).await, Ok(7));
        let no_offsets: Vec<usize> = Vec::new();
        let panicked = panic_as_error(async { Ok::<_, WorkerError>(no_offsets[std::hint::black_box(0)]) })
            .await
            .expect_err("indexing an empty list panics");
        assert!(matches!(&panicked, WorkerError::Panicked(reason) if reason.contains("index out of bounds")));
        let status = Status::from(panicked);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(status.message().starts_with("the worker panicked handling the request: index out of bounds"));
    }
}
