//! The server's half of [`super`]: requests read in place ([`Requests`]), answers sent as
//! [`encode_frame`]'s chunks, for unary and for streaming calls.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use prost::Message;
use tonic::Status;
use tonic::codegen::http::{self, HeaderValue, header};

use super::{ChunkBody, Reader, Requests, encode_frame};

/// Serves one unary call: decodes the request from `request` (at most `max_request_bytes`), runs
/// `handler` on it, and answers with its message's payloads uncopied ([`encode_frame`])
/// and `grpc-status: 0` in the trailers, or with its `Status` alone (a trailers-only answer).
pub async fn serve_unary<Q, A, F, Fut>(
    request: http::Request<tonic::body::Body>,
    max_request_bytes: usize,
    handler: F,
) -> http::Response<tonic::body::Body>
where
    Q: Message + Default + Send + Sync + 'static,
    A: Message,
    F: FnOnce(tonic::Request<Q>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<A>, Status>>,
{
    let answer = async {
        let (parts, body) = request.into_parts();
        // Held until the answer is made: the request's body ends with the call, not before.
        let mut requests = Requests::<Q>::new(body, max_request_bytes, Reader::Server);
        let message = read_request(&mut requests).await?;
        let request = tonic::Request::from_parts(
            tonic::metadata::MetadataMap::from_headers(parts.headers),
            parts.extensions,
            message,
        );
        let (metadata, message, _) = handler(request).await?.into_parts();
        Ok::<_, Status>((metadata, encode_frame(&message)?))
    };
    match answer.await {
        Ok((metadata, chunks)) => {
            grpc_response(metadata, ChunkBody::new(chunks, Some(status_trailers(&Status::ok("")))))
        }
        Err(status) => status.into_http(),
    }
}

/// The one message of a unary request, decoded in place once its bytes are in. A failing body (the
/// worker's receiving budget) keeps its own status.
async fn read_request<Q: Message + Default>(requests: &mut Requests<Q>) -> Result<Q, Status> {
    requests.message().await?.ok_or_else(|| Status::invalid_argument("the request had no message"))
}

/// Serves one streaming call: `handler` gets the request's messages as they complete, each
/// decoded in place (at most `max_request_bytes`), and returns its answers as a stream; each
/// answer goes out as it comes, its payloads uncopied ([`encode_frame`]), then the trailers: status
/// OK at the stream's end, or the first failed item's status, which ends the call.
pub async fn serve_streaming<Q, A, F, Fut, S>(
    request: http::Request<tonic::body::Body>,
    max_request_bytes: usize,
    handler: F,
) -> http::Response<tonic::body::Body>
where
    Q: Message + Default,
    A: Message,
    F: FnOnce(tonic::Request<Requests<Q>>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<S>, Status>>,
    S: Stream<Item = Result<A, Status>> + Send + 'static,
{
    let (parts, body) = request.into_parts();
    let requests = Requests::new(body, max_request_bytes, Reader::Server);
    let request = tonic::Request::from_parts(
        tonic::metadata::MetadataMap::from_headers(parts.headers),
        parts.extensions,
        requests,
    );
    match handler(request).await {
        Ok(response) => {
            let (metadata, answers, _) = response.into_parts();
            grpc_response(metadata, AnswerBody { answers: Box::pin(answers), chunks: VecDeque::new(), ended: false })
        }
        Err(status) => status.into_http(),
    }
}

fn grpc_response<B>(metadata: tonic::metadata::MetadataMap, body: B) -> http::Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    let mut response = http::Response::new(tonic::body::Body::new(body));
    *response.headers_mut() = metadata.into_headers();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// `status` as a call's trailers (`grpc-status`, and its message and details when it has them).
fn status_trailers(status: &Status) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        // A message that cannot be a header value: the code alone still ends the call rightly.
        trailers.clear();
        trailers.insert("grpc-status", HeaderValue::from(status.code() as i32));
    }
    trailers
}

/// A streaming call's answer body: each answer's [`encode_frame`] chunks as the answer comes,
/// then the trailers with the call's status.
struct AnswerBody<S> {
    answers: Pin<Box<S>>,
    /// The chunks of the answer being sent.
    chunks: VecDeque<Bytes>,
    /// The trailers went: nothing more.
    ended: bool,
}

impl<S, A> http_body::Body for AnswerBody<S>
where
    S: Stream<Item = Result<A, Status>>,
    A: Message,
{
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(self.answers.as_mut().poll_next(context)) {
            Some(Ok(answer)) => match encode_frame(&answer) {
                Ok(chunks) => {
                    self.chunks.extend(chunks);
                    let chunk = self.chunks.pop_front().expect("a frame has its prefix");
                    return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
                }
                Err(status) => status,
            },
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.ended = true;
        Poll::Ready(Some(Ok(http_body::Frame::trailers(status_trailers(&status)))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.chunks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::super::GRPC_PREFIX_BYTES;
    use super::*;
    use crate::v1;
    use tonic::Code;

    fn tensor(bytes: Bytes) -> v1::WireTensor {
        v1::WireTensor { dtype: 2, shape: vec![1, bytes.len() as u64 / 2], data: bytes }
    }

    fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(future)
    }

    /// What `serve_unary` reads from a request whose body came as `frames`.
    fn read(frames: Vec<Bytes>, max_bytes: usize) -> Result<v1::ForwardRequest, Status> {
        let body = tonic::body::Body::new(ChunkBody::new(frames, None));
        block_on(read_request(&mut Requests::new(body, max_bytes, Reader::Server)))
    }

    fn rows_request(payload: Bytes) -> v1::ForwardRequest {
        v1::ForwardRequest {
            request_id: 7,
            tokens: Some(v1::TokenRows { layer: 1, rows: Some(tensor(payload)), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn a_payload_that_arrived_in_one_frame_is_decoded_without_a_copy() {
        let payload = Bytes::from((0..64 * 1024).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let message = rows_request(payload.clone());
        // The frames as the sender's chunks became them: the payload one frame of its own.
        let frames = encode_frame(&message).expect("encodes");
        let decoded = read(frames, 1 << 20).expect("decodes");
        assert_eq!(decoded, message);
        let rows = &decoded.tokens.as_ref().and_then(|tokens| tokens.rows.as_ref()).expect("rows").data;
        assert_eq!(rows.as_ptr(), payload.as_ptr(), "the received frame's memory, not a copy");
    }

    #[test]
    fn a_message_cut_into_any_frames_decodes_the_same() {
        let payload = Bytes::from((0..10_000).map(|i| (i % 241) as u8).collect::<Vec<_>>());
        let message = rows_request(payload);
        let whole: Vec<u8> = encode_frame(&message).expect("encodes").iter().flat_map(|chunk| chunk.to_vec()).collect();
        for size in [1, 3, 5, 7, 4096, whole.len()] {
            let frames = whole.chunks(size).map(Bytes::copy_from_slice).collect();
            assert_eq!(read(frames, 1 << 20).expect("decodes"), message, "frames of {size} bytes");
        }
    }

    #[test]
    fn unreadable_requests_are_refused_with_the_callers_codes() {
        let whole: Vec<u8> = encode_frame(&rows_request(Bytes::from(vec![1; 100]))).expect("encodes").concat();
        let code = |frames: Vec<Bytes>, max_bytes: usize| read(frames, max_bytes).unwrap_err();
        let empty = code(Vec::new(), 1 << 20);
        assert_eq!((empty.code(), empty.message()), (Code::InvalidArgument, "the request had no message"));
        let cut = code(vec![Bytes::copy_from_slice(&whole[..whole.len() - 1])], 1 << 20);
        assert_eq!(cut.code(), Code::InvalidArgument, "{cut:?}");
        assert!(cut.message().starts_with("the request is not a valid message"), "{cut:?}");
        let large = code(vec![Bytes::copy_from_slice(&whole[..GRPC_PREFIX_BYTES])], 10);
        assert_eq!(large.code(), Code::ResourceExhausted, "refused from its prefix alone: {large:?}");
        let mut compressed = whole.clone();
        compressed[0] = 1;
        assert_eq!(code(vec![Bytes::from(compressed)], 1 << 20).code(), Code::Unimplemented);
        let mut garbage = whole[..GRPC_PREFIX_BYTES].to_vec();
        garbage[1..].copy_from_slice(&3u32.to_be_bytes());
        garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert_eq!(code(vec![Bytes::from(garbage)], 1 << 20).code(), Code::InvalidArgument);
    }

    #[test]
    fn an_answer_body_tells_hyper_it_has_ended_only_after_its_trailers() {
        use http_body::Body;
        let answer = rows_request(Bytes::from(vec![5; 1024]));
        let answers = futures::stream::iter([Ok::<_, Status>(answer)]);
        let mut body = AnswerBody { answers: Box::pin(answers), chunks: VecDeque::new(), ended: false };
        let mut ends = Vec::new();
        let mut trailers = None;
        block_on(std::future::poll_fn(|context| {
            while let Some(frame) = std::task::ready!(Pin::new(&mut body).poll_frame(context)) {
                let frame = frame.expect("infallible");
                if frame.is_trailers() {
                    trailers = frame.into_trailers().ok();
                }
                ends.push(body.is_end_stream());
            }
            Poll::Ready(())
        }));
        assert!(ends.len() >= 2, "the answer's chunks, then the trailers: {ends:?}");
        let (last, before) = ends.split_last().expect("frames");
        assert!(*last, "ended once the trailers went");
        assert!(before.iter().all(|ended| !ended), "not while chunks or trailers are left: {ends:?}");
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    }

    /// Every answer (then the end) a client reads from `response`.
    fn answers_of(response: http::Response<tonic::body::Body>) -> Vec<Result<Option<v1::ForwardRequest>, Status>> {
        let mut answers = super::super::Answers::new(response.into_body(), 1 << 20, Reader::Client);
        block_on(async {
            let mut read = Vec::new();
            loop {
                let answer = answers.message().await;
                let last = !matches!(answer, Ok(Some(_)));
                read.push(answer);
                if last {
                    return read;
                }
            }
        })
    }

    /// A streaming call whose request body came as `frames`, its handler answering each request
    /// with itself (and with `then` after them).
    fn echo_stream(frames: Vec<Bytes>, then: Option<Status>) -> http::Response<tonic::body::Body> {
        let request = http::Request::new(tonic::body::Body::new(ChunkBody::new(frames, None)));
        let handler = |request: tonic::Request<Requests<v1::ForwardRequest>>| async move {
            let echoed = futures::StreamExt::chain(request.into_inner(), futures::stream::iter(then.map(Err)));
            Ok(tonic::Response::new(echoed))
        };
        block_on(serve_streaming(request, 1 << 20, handler))
    }

    #[test]
    fn a_streaming_call_answers_each_request_in_place_then_ok() {
        let payloads: Vec<Bytes> = (0..3u8).map(|seed| Bytes::from(vec![seed + 1; 32 * 1024])).collect();
        let sent: Vec<v1::ForwardRequest> = payloads.iter().map(|payload| rows_request(payload.clone())).collect();
        let frames = sent.iter().flat_map(|message| encode_frame(message).expect("encodes")).collect();

        let response = echo_stream(frames, None);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/grpc");
        let read = answers_of(response);
        assert_eq!(read.len(), 4, "three answers, then the end: {read:?}");
        for ((answer, expected), payload) in read.iter().zip(&sent).zip(&payloads) {
            let answer = answer.as_ref().expect("read").as_ref().expect("an answer");
            assert_eq!(answer, expected);
            let rows = &answer.tokens.as_ref().and_then(|tokens| tokens.rows.as_ref()).expect("rows").data;
            assert_eq!(rows.as_ptr(), payload.as_ptr(), "the request's frame went out as it came, never copied");
        }
        assert!(matches!(read[3], Ok(None)), "status OK at the end: {:?}", read[3]);
    }

    #[test]
    fn a_failed_answer_ends_the_streaming_call_with_its_status() {
        let frames = encode_frame(&rows_request(Bytes::from(vec![5; 100]))).expect("encodes");
        let read = answers_of(echo_stream(frames, Some(Status::unavailable("worker stopped"))));
        assert_eq!(read.len(), 2, "{read:?}");
        assert!(matches!(read[0], Ok(Some(_))), "the answer before the failure arrives: {:?}", read[0]);
        let status = read[1].as_ref().unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::Unavailable, "worker stopped"));
    }

    #[test]
    fn a_streamed_request_cut_inside_a_message_is_refused_after_the_whole_ones() {
        let mut whole: Vec<u8> = encode_frame(&rows_request(Bytes::from(vec![6; 100]))).expect("encodes").concat();
        let message_bytes = whole.len();
        whole.extend_from_within(..message_bytes - 1);
        let read = answers_of(echo_stream(vec![Bytes::from(whole)], None));
        assert_eq!(read.len(), 2, "{read:?}");
        assert!(matches!(read[0], Ok(Some(_))), "{:?}", read[0]);
        let status = read[1].as_ref().unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("ends inside itself"), "{status:?}");
    }
}
