//! The seam under the client: how one request reaches one worker and its answer comes back.
//!
//! [`ExpertTransport`] is what the exchange needs of a network; [`GrpcTransport`] is the real one
//! (gRPC over HTTP/2 connections the client drives itself, `H2Channel`, several per worker taken
//! in turn, socket bytes counted). The reference layer plugs an
//! in-process transport into the same client, and tests plug scripted ones.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};
use futures::stream::{BoxStream, FuturesUnordered, StreamExt};
use switchyard_common::clock::unix_nanos;
use switchyard_common::transport::{H2Channel, WireCounters};
use switchyard_proto::payload_last::PayloadLast;
use switchyard_proto::v1;
use switchyard_proto::zero_copy::FirstAnswer;

use crate::error::ClientError;
use crate::ledger::RpcTiming;

/// A worker as the routing table names it (its gRPC endpoint, or an in-process name).
pub type Endpoint = Arc<str>;

/// A worker's answer to one request, with the client's timing of the trip.
#[derive(Debug, Clone)]
pub struct Answer {
    pub response: v1::ForwardResponse,
    pub timing: RpcTiming,
}

/// The answers of [`ExpertTransport::forward_chunks`]: each with its request's position.
pub type ChunkAnswers = BoxStream<'static, (usize, Result<Answer, ClientError>)>;

/// Each of `requests` on its own through `transport.forward`, answers with their positions as
/// they arrive: [`ExpertTransport::forward_chunks`] where a transport has no streams, or one chunk.
pub(crate) fn forward_each<T: ExpertTransport + ?Sized>(
    transport: &T,
    endpoint: &Endpoint,
    requests: Vec<v1::ForwardRequest>,
    deadline: Duration,
) -> ChunkAnswers {
    requests
        .into_iter()
        .enumerate()
        .map(|(position, request)| transport.forward(endpoint, request, deadline).map(move |answer| (position, answer)))
        .collect::<FuturesUnordered<_>>()
        .boxed()
}

/// Metadata key carrying the client's request id across the hop, for the worker's spans.
pub const REQUEST_ID_METADATA: &str = "x-request-id";

/// Carries one request to one worker. Implementations are cheap to share between concurrent calls.
pub trait ExpertTransport: Send + Sync + fmt::Debug {
    /// Sends `request` to `endpoint`; the answer, or why there is none. `deadline` bounds the worker's
    /// side too where the transport can say so (gRPC's `grpc-timeout`); the exchange enforces it.
    fn forward(
        &self,
        endpoint: &Endpoint,
        request: v1::ForwardRequest,
        deadline: Duration,
    ) -> BoxFuture<'static, Result<Answer, ClientError>>;

    /// Sends `requests` to `endpoint` as the chunks of one stream, in order; each answer comes
    /// with its request's position in `requests`, as it arrives. By default each goes on its own.
    fn forward_chunks(
        &self,
        endpoint: &Endpoint,
        requests: Vec<v1::ForwardRequest>,
        deadline: Duration,
    ) -> ChunkAnswers {
        forward_each(self, endpoint, requests, deadline)
    }

    /// Bytes each worker's connections wrote and read on their sockets so far: `(endpoint, sent,
    /// received)`.
    fn wire_bytes(&self) -> Vec<(Endpoint, u64, u64)> {
        Vec::new()
    }

    /// Connections each worker is reached over: the client spreads a large payload over as many
    /// requests.
    fn connections_per_worker(&self) -> usize {
        1
    }
}

/// One connection per core, up to 8: on loopback each HTTP/2 connection is bound by the one core
/// that encodes and frames it.
pub fn default_connections() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from).clamp(1, 8)
}

/// A worker's connections (lazily opened, each with its own byte counters), taken in turn.
#[derive(Debug)]
struct Stripes {
    clients: Vec<H2Channel>,
    counters: Arc<WireCounters>,
    next: usize,
}

/// gRPC to every worker over `connections` HTTP/2 connections each, requests taking them in turn.
#[derive(Debug)]
pub struct GrpcTransport {
    connections: usize,
    workers: Mutex<HashMap<Endpoint, Stripes>>,
}

impl Default for GrpcTransport {
    fn default() -> Self {
        Self::new(1)
    }
}

impl GrpcTransport {
    pub fn new(connections: usize) -> Self {
        Self { connections: connections.max(1), workers: Mutex::new(HashMap::new()) }
    }

    fn connection(&self, endpoint: &Endpoint) -> Result<H2Channel, ClientError> {
        let mut workers = self.workers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !workers.contains_key(endpoint) {
            let counters = Arc::new(WireCounters::default());
            let clients = (0..self.connections)
                .map(|_| switchyard_common::transport::counted_h2_channel(endpoint, counters.clone()))
                .collect::<Result<_, _>>()
                .map_err(|error| ClientError::BadEndpoint {
                    endpoint: endpoint.to_string(),
                    reason: error.to_string(),
                })?;
            workers.insert(endpoint.clone(), Stripes { clients, counters, next: 0 });
        }
        let stripes = workers.get_mut(endpoint).expect("inserted above");
        let client = stripes.clients[stripes.next].clone();
        stripes.next = (stripes.next + 1) % stripes.clients.len();
        Ok(client)
    }
}

/// A gRPC request carrying `message`, with its deadline, the call's request id and the trace
/// context of `span` (the call's) as metadata.
fn grpc_request<T>(message: T, request_id: u64, deadline: Duration, span: &tracing::Span) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    if let Ok(value) = request_id.to_string().parse() {
        request.metadata_mut().insert(REQUEST_ID_METADATA, value);
    }
    switchyard_common::otlp::inject(span, request.metadata_mut());
    request
}

/// Reads what follows the last answer a call expects, its status, after the answers were used (a
/// worker sends each answer only once it has succeeded, whole, and ends with status OK:
/// [`FirstAnswer`]), so that the stream ends in order rather than by a reset the worker would count
/// as a cancelled call; a worker that breaks that contract is logged. It holds no span of the call:
/// the call's spans end, and are exported, when the call does.
async fn read_status_after_answers(
    mut rest: switchyard_proto::zero_copy::Answers<v1::ForwardResponse>,
    endpoint: Endpoint,
    request_id: u64,
    deadline: Duration,
) {
    let rest_of_body = async {
        let mut unexpected = 0;
        while rest.message().await?.is_some() {
            unexpected += 1;
        }
        Ok::<_, tonic::Status>(unexpected)
    };
    match tokio::time::timeout(deadline, rest_of_body).await {
        Ok(Ok(0)) => {}
        Ok(Ok(unexpected)) => {
            tracing::warn!(%endpoint, request_id, unexpected, "a worker answered more than the call asked; the extra answers were ignored")
        }
        Ok(Err(status)) => {
            tracing::warn!(%endpoint, request_id, %status, "a worker followed its answers with a failure; the answers were used")
        }
        Err(_) => tracing::warn!(%endpoint, request_id, ?deadline, "a worker sent no status after its answers"),
    }
}

/// When a stream of chunks was sent.
#[derive(Debug, Clone, Copy)]
struct StreamSent {
    sent_unix_nanos: u64,
    started: Instant,
}

/// A stream of chunks in flight: its answers, and the chunks still unanswered.
struct StreamAnswers {
    endpoint: Endpoint,
    /// Taken once every chunk is answered, to read the stream's status after.
    answers: Option<switchyard_proto::zero_copy::Answers<v1::ForwardResponse>>,
    pending: BTreeSet<usize>,
    sent: StreamSent,
    request_id: u64,
    deadline: Duration,
}

impl StreamAnswers {
    /// Each chunk's answer (or the worker's refusal of it) with its position, as they arrive; a
    /// failure of the stream itself is the first pending chunk's, and ends it.
    fn into_stream(self) -> ChunkAnswers {
        futures::stream::unfold(self, |mut state| async move {
            let first_pending = *state.pending.first()?;
            let broken = |error| (first_pending, Err(error));
            let answers = state.answers.as_mut()?;
            let (position, answer) = match answers.message().await {
                Ok(Some(response)) => state.answer(response),
                Ok(None) => broken(ClientError::BadResponse {
                    endpoint: state.endpoint.to_string(),
                    reason: format!("the stream ended before answering chunk {first_pending}"),
                }),
                Err(status) => broken(ClientError::from_status(&state.endpoint, &status)),
            };
            // A chunk's own answer took it off `pending`; a failure charged to a chunk still
            // pending is the stream's, and nothing more will come.
            if state.pending.contains(&position) {
                state.pending.clear();
            }
            if state.pending.is_empty()
                && let Some(rest) = state.answers.take()
            {
                let endpoint = state.endpoint.clone();
                tokio::spawn(read_status_after_answers(rest, endpoint, state.request_id, state.deadline));
            }
            Some(((position, answer), state))
        })
        .boxed()
    }

    fn answer(&mut self, response: v1::ForwardResponse) -> (usize, Result<Answer, ClientError>) {
        let position = response.sequence as usize;
        if !self.pending.remove(&position) {
            let reason = format!("an answer to chunk {position}, which was not pending");
            let first = self.pending.first().copied().unwrap_or(position);
            return (first, Err(ClientError::BadResponse { endpoint: self.endpoint.to_string(), reason }));
        }
        if let Some(error) = &response.error {
            let code = tonic::Code::from_i32(error.code);
            let status = tonic::Status::with_details(code, error.message.clone(), error.details.clone().into());
            return (position, Err(ClientError::from_status(&self.endpoint, &status)));
        }
        let timing = RpcTiming {
            elapsed: self.sent.started.elapsed(),
            sent_unix_nanos: self.sent.sent_unix_nanos,
            answered_unix_nanos: unix_nanos(),
        };
        (position, Ok(Answer { response, timing }))
    }
}

impl ExpertTransport for GrpcTransport {
    fn forward(
        &self,
        endpoint: &Endpoint,
        request: v1::ForwardRequest,
        deadline: Duration,
    ) -> BoxFuture<'static, Result<Answer, ClientError>> {
        let connection = self.connection(endpoint);
        let endpoint = endpoint.clone();
        let call = tracing::Span::current();
        Box::pin(async move {
            let mut client = connection?;
            let request_id = request.request_id;
            // The rows end the message, so the worker has all of it once they are in.
            let request = grpc_request(PayloadLast(request), request_id, deadline, &call);
            let sent_unix_nanos = unix_nanos();
            let started = Instant::now();
            // The rows go to the socket as the `Bytes` they are: tonic's generated client would copy
            // every payload into one buffer first.
            let answer = switchyard_proto::zero_copy::unary_answer_first(
                &mut client,
                switchyard_proto::FORWARD_PATH,
                request,
                switchyard_common::transport::MAX_MESSAGE_BYTES,
            )
            .await;
            let timing = RpcTiming { elapsed: started.elapsed(), sent_unix_nanos, answered_unix_nanos: unix_nanos() };
            match answer {
                Ok(FirstAnswer { answer, rest }) => {
                    if let Some(rest) = rest {
                        tokio::spawn(read_status_after_answers(rest, endpoint, request_id, deadline));
                    }
                    Ok(Answer { response: answer, timing })
                }
                Err(status) => Err(ClientError::from_status(&endpoint, &status)),
            }
        })
    }

    fn forward_chunks(
        &self,
        endpoint: &Endpoint,
        requests: Vec<v1::ForwardRequest>,
        deadline: Duration,
    ) -> ChunkAnswers {
        if requests.len() < 2 {
            return forward_each(self, endpoint, requests, deadline);
        }
        let mut requests = requests;
        // The stream answers in completion order: each chunk carries its position back.
        for (position, request) in requests.iter_mut().enumerate() {
            request.sequence = position as u32;
        }
        let connection = self.connection(endpoint);
        let endpoint = endpoint.clone();
        let call = tracing::Span::current();
        let opened = async move {
            let mut client = connection?;
            let request_id = requests.first().map_or(0, |request| request.request_id);
            let chunks = requests.len();
            let chunks_rows_last = requests.into_iter().map(PayloadLast).collect();
            let request = grpc_request(chunks_rows_last, request_id, deadline, &call);
            let (sent_unix_nanos, started) = (unix_nanos(), Instant::now());
            let answers = switchyard_proto::zero_copy::streaming(
                &mut client,
                switchyard_proto::FORWARD_STREAM_PATH,
                request,
                switchyard_common::transport::MAX_MESSAGE_BYTES,
            )
            .await
            .map_err(|status| ClientError::from_status(&endpoint, &status))?;
            let sent = StreamSent { sent_unix_nanos, started };
            Ok::<_, ClientError>(StreamAnswers {
                endpoint,
                answers: Some(answers),
                pending: (0..chunks).collect(),
                sent,
                request_id,
                deadline,
            })
        };
        futures::stream::once(opened)
            .flat_map(|opened| match opened {
                Ok(answers) => answers.into_stream(),
                Err(error) => futures::stream::iter([(0, Err(error))]).boxed(),
            })
            .boxed()
    }

    fn wire_bytes(&self) -> Vec<(Endpoint, u64, u64)> {
        let workers = self.workers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut bytes: Vec<_> = workers
            .iter()
            .map(|(endpoint, stripes)| (endpoint.clone(), stripes.counters.sent(), stripes.counters.received()))
            .collect();
        bytes.sort();
        bytes
    }

    fn connections_per_worker(&self) -> usize {
        self.connections
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(address: &str) -> Endpoint {
        address.into()
    }

    /// Which of a worker's connections its next request takes, after each of `requests` requests.
    fn turns(transport: &GrpcTransport, worker: &Endpoint, requests: usize) -> Vec<usize> {
        (0..requests)
            .map(|_| {
                transport.connection(worker).expect("a valid endpoint");
                let workers = transport.workers.lock().expect("not poisoned");
                workers[worker].next
            })
            .collect()
    }

    #[tokio::test]
    async fn a_worker_s_connections_are_taken_in_turn_and_opened_once() {
        let transport = GrpcTransport::new(3);
        assert_eq!(transport.connections_per_worker(), 3);
        let (first, second) = (endpoint("http://127.0.0.1:1"), endpoint("http://127.0.0.1:2"));
        assert_eq!(turns(&transport, &first, 5), [1, 2, 0, 1, 2]);
        assert_eq!(turns(&transport, &second, 1), [1], "each worker has its own turn");
        assert_eq!(turns(&transport, &first, 1), [0]);
        let workers = transport.workers.lock().expect("not poisoned");
        assert!(workers.values().all(|stripes| stripes.clients.len() == 3));
    }

    #[tokio::test]
    async fn no_connections_means_one() {
        let transport = GrpcTransport::new(0);
        assert_eq!(transport.connections_per_worker(), 1);
        let worker = endpoint("http://127.0.0.1:1");
        assert_eq!(turns(&transport, &worker, 2), [0, 0]);
    }

    #[tokio::test]
    async fn a_bad_endpoint_is_named_in_the_error() {
        let transport = GrpcTransport::default();
        let error = transport.connection(&endpoint("not a uri")).expect_err("no origin");
        assert!(matches!(&error, ClientError::BadEndpoint { endpoint, .. } if endpoint == "not a uri"), "{error:?}");
        assert!(transport.wire_bytes().is_empty(), "a failed endpoint keeps no connections");
    }

    #[tokio::test]
    async fn wire_bytes_are_listed_per_worker_in_endpoint_order() {
        let transport = GrpcTransport::new(2);
        let (late, early) = (endpoint("http://127.0.0.1:2"), endpoint("http://127.0.0.1:1"));
        transport.connection(&late).expect("a valid endpoint");
        transport.connection(&early).expect("a valid endpoint");
        assert_eq!(transport.wire_bytes(), [(early, 0, 0), (late, 0, 0)], "no connection was opened yet");
    }

    /// A transport that overrides nothing it need not.
    #[derive(Debug)]
    struct Unstriped;

    impl ExpertTransport for Unstriped {
        fn forward(
            &self,
            endpoint: &Endpoint,
            _request: v1::ForwardRequest,
            _deadline: Duration,
        ) -> BoxFuture<'static, Result<Answer, ClientError>> {
            let error = ClientError::BadEndpoint { endpoint: endpoint.to_string(), reason: "scripted".into() };
            futures::future::ready(Err(error)).boxed()
        }
    }

    #[test]
    fn a_transport_counts_no_bytes_and_one_connection_unless_it_says() {
        assert!(Unstriped.wire_bytes().is_empty());
        assert_eq!(Unstriped.connections_per_worker(), 1);
    }

    #[test]
    fn the_default_is_a_connection_per_core_up_to_eight() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(default_connections(), cores.min(8));
    }

    fn stream(pending: impl IntoIterator<Item = usize>) -> StreamAnswers {
        StreamAnswers {
            endpoint: endpoint("http://127.0.0.1:1"),
            answers: None,
            pending: pending.into_iter().collect(),
            sent: StreamSent { sent_unix_nanos: 1, started: Instant::now() },
            request_id: 9,
            deadline: Duration::from_secs(1),
        }
    }

    fn answer_to(sequence: u32) -> v1::ForwardResponse {
        v1::ForwardResponse { sequence, ..Default::default() }
    }

    #[test]
    fn a_chunk_s_answer_is_taken_once_at_its_position() {
        let mut stream = stream(0..3);
        let (position, answer) = stream.answer(answer_to(1));
        assert_eq!(position, 1);
        let answer = answer.expect("chunk 1 was pending");
        assert_eq!(answer.response.sequence, 1);
        assert_eq!(answer.timing.sent_unix_nanos, 1);
        assert_eq!(stream.pending.iter().copied().collect::<Vec<_>>(), [0, 2]);

        let (position, again) = stream.answer(answer_to(1));
        assert_eq!(position, 0, "an answer to no pending chunk fails the first pending one");
        assert!(
            matches!(&again, Err(ClientError::BadResponse { reason, .. }) if reason.contains("chunk 1, which was not pending")),
            "{again:?}"
        );
    }

    #[test]
    fn a_chunk_s_refusal_is_its_worker_s_status() {
        let mut stream = stream([4]);
        let refusal = v1::ForwardResponse {
            sequence: 4,
            error: Some(v1::RequestError {
                code: tonic::Code::Unavailable as i32,
                message: "draining".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (position, answer) = stream.answer(refusal);
        assert_eq!(position, 4);
        let error = answer.expect_err("a refused chunk");
        assert_eq!(error.code(), tonic::Code::Unavailable);
        assert!(error.to_string().contains("draining"), "{error}");
        assert!(stream.pending.is_empty());
    }
}
