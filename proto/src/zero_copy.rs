//! gRPC calls, unary and streaming, whose large `bytes` fields go to the socket as the [`Bytes`]
//! they are, and come out of it as slices of the frames they arrived in.
//!
//! Tonic's client encodes every message into one contiguous buffer, so each tensor payload was
//! copied once more on its way out (a fresh multi-megabyte buffer per request, page faults
//! included). Here a message is encoded as a list of chunks instead: prost writes tags, lengths and
//! small fields into a small buffer, and every `bytes` field of at least [`SHARED_FIELD_BYTES`] is
//! taken as a slice of the caller's `Bytes` (prost hands `Bytes` fields to [`BufMut::put`], and
//! `Bytes::copy_to_bytes` shares instead of copying). The chunks are the request's HTTP/2 body
//! as they are; hyper writes them with vectored writes. [`serve_unary`] and [`serve_streaming`]
//! are the server's half: a handler's answers go out the same way.
//!
//! Tonic's decoders copy every received DATA frame into one buffer before decoding, a copy of every
//! row a worker receives and of every answer a client does. Both halves here decode from the frames
//! as they came instead (`ChunkedBuf`): a `bytes` field that arrived within one frame (a payload its
//! sender wrote as one chunk, up to HTTP/2's frame size) is a slice of that frame.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::buf::UninitSlice;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tonic::codegen::http::{self, HeaderValue, Method, StatusCode, Uri, header};
use tonic::{Code, Status};

use crate::chunked_buf::ChunkedBuf;

mod server;
pub use server::{serve_streaming, serve_unary};

/// `bytes` fields at least this long are shared, not copied: below it a slice costs more than the
/// copy.
pub const SHARED_FIELD_BYTES: usize = 4096;

/// gRPC's length prefix: a compression flag and the message length (big-endian `u32`).
const GRPC_PREFIX_BYTES: usize = 5;

/// `message` as one length-prefixed gRPC frame, in chunks: the large `bytes` fields are slices of
/// the message's own buffers, everything else is copied into small chunks between them.
pub fn encode_frame(message: &impl Message) -> Result<Vec<Bytes>, Status> {
    let length = message.encoded_len();
    let length = u32::try_from(length)
        .map_err(|_| Status::resource_exhausted(format!("a message of {length} bytes is over gRPC's 4 GiB")))?;
    let mut writer = ChunkWriter::default();
    let mut prefix = [0u8; GRPC_PREFIX_BYTES];
    prefix[1..].copy_from_slice(&length.to_be_bytes());
    writer.put_slice(&prefix);
    message.encode(&mut writer).map_err(|error| Status::internal(format!("encoding a message: {error}")))?;
    Ok(writer.finish())
}

/// A [`BufMut`] that keeps large `put`s as chunks of their own.
#[derive(Debug, Default)]
struct ChunkWriter {
    chunks: Vec<Bytes>,
    /// Bytes written since the last shared chunk.
    head: BytesMut,
}

impl ChunkWriter {
    fn flush_head(&mut self) {
        if !self.head.is_empty() {
            self.chunks.push(self.head.split().freeze());
        }
    }

    fn finish(mut self) -> Vec<Bytes> {
        self.flush_head();
        self.chunks
    }
}

// SAFETY: every method but `put` and `put_slice` is `BytesMut`'s own, on `head`; those two only
// write through `head`'s safe API or keep the source as a chunk.
#[allow(unsafe_code)]
unsafe impl BufMut for ChunkWriter {
    fn remaining_mut(&self) -> usize {
        self.head.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, count: usize) {
        // SAFETY: the caller's contract is `BytesMut::advance_mut`'s: `count` bytes of
        // `chunk_mut()` were initialised.
        unsafe { self.head.advance_mut(count) }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.head.chunk_mut()
    }

    fn put<T: Buf>(&mut self, mut source: T)
    where
        Self: Sized,
    {
        if source.remaining() >= SHARED_FIELD_BYTES {
            self.flush_head();
            self.chunks.push(source.copy_to_bytes(source.remaining()));
        } else {
            while source.has_remaining() {
                let chunk = source.chunk();
                let taken = chunk.len();
                self.head.extend_from_slice(chunk);
                source.advance(taken);
            }
        }
    }

    fn put_slice(&mut self, source: &[u8]) {
        self.head.extend_from_slice(source);
    }
}

/// An HTTP body of ready chunks, and the trailers after them (a server's answer has some).
#[derive(Debug)]
struct ChunkBody {
    chunks: VecDeque<Bytes>,
    remaining: u64,
    trailers: Option<http::HeaderMap>,
}

impl ChunkBody {
    fn new(chunks: Vec<Bytes>, trailers: Option<http::HeaderMap>) -> Self {
        let remaining = chunks.iter().map(|chunk| chunk.len() as u64).sum();
        Self { chunks: chunks.into(), remaining, trailers }
    }
}

impl http_body::Body for ChunkBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _context: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            self.remaining -= chunk.len() as u64;
            return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
        }
        Poll::Ready(self.trailers.take().map(|trailers| Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// What carries one call: sends its request (headers, and a body of chunks ready to go) and returns
/// the response once its headers are in: `switchyard_common`'s `H2Channel`, which hands the body to
/// HTTP/2 with its headers (tonic's `Channel` would pass it through two more tasks first, a wake
/// each on a small call).
pub trait CallChannel: Send {
    fn send(
        &mut self,
        request: http::Request<Vec<Bytes>>,
    ) -> impl Future<Output = Result<http::Response<tonic::body::Body>, Status>> + Send;
}

/// Calls the unary method `path` (`/package.Service/Method`) on `channel` with `request`, sending
/// its payloads without a copy ([`encode_frame`]); the request's metadata (a `grpc-timeout` set by
/// [`tonic::Request::set_timeout`] included) goes as headers. `max_answer_bytes` bounds the answer
/// as `max_decoding_message_size` does.
pub async fn unary<C, Q, A>(
    channel: &mut C,
    path: &'static str,
    request: tonic::Request<Q>,
    max_answer_bytes: usize,
) -> Result<A, Status>
where
    C: CallChannel,
    Q: Message,
    A: Message + Default,
{
    unary_answer_first(channel, path, request, max_answer_bytes).await?.checked().await
}

/// [`unary`], returning the answer as soon as its bytes are in: the status that follows it is
/// left to check ([`FirstAnswer`]).
pub async fn unary_answer_first<C, Q, A>(
    channel: &mut C,
    path: &'static str,
    request: tonic::Request<Q>,
    max_answer_bytes: usize,
) -> Result<FirstAnswer<A>, Status>
where
    C: CallChannel,
    Q: Message,
    A: Message + Default,
{
    streaming(channel, path, request.map(|message| vec![message]), max_answer_bytes).await?.answer_first().await
}

/// A unary call's answer, taken once its last byte was in.
///
/// HTTP/2 servers write the status (the trailers) after the message, and often in a write of its
/// own (h2 sends a DATA frame of over 256 bytes from the caller's buffer and flushes it before it
/// encodes the trailers): a caller that waits for the status waits for that second write and the
/// reader's second wake, tens of microseconds on a small call. A server that answers only once it
/// has succeeded, with the whole message encoded before any of it is sent (the worker's `Forward`),
/// never follows a message with a failure, so its caller may use the answer at once and check the
/// status after ([`Messages::finish`] on `rest`).
#[derive(Debug)]
pub struct FirstAnswer<M> {
    pub answer: M,
    /// The rest of the body, when the status had not come with the answer.
    pub rest: Option<Messages<M>>,
}

impl<M: Message + Default> FirstAnswer<M> {
    /// The answer once the status is in and OK, as a unary call takes it.
    pub async fn checked(self) -> Result<M, Status> {
        if let Some(rest) = self.rest {
            rest.finish().await?;
        }
        Ok(self.answer)
    }
}

/// Calls method `path` with `messages` sent in order on one stream, each uncopied ([`encode_frame`]);
/// the worker reads each as its bytes complete. Returns the answers once the server has answered
/// with headers (a trailers-only failure, or an HTTP error without a gRPC status, is returned as
/// the error); each answer is at most `max_answer_bytes`.
pub async fn streaming<C, Q, A>(
    channel: &mut C,
    path: &'static str,
    request: tonic::Request<Vec<Q>>,
    max_answer_bytes: usize,
) -> Result<Answers<A>, Status>
where
    C: CallChannel,
    Q: Message,
    A: Message + Default,
{
    let (metadata, _, messages) = request.into_parts();
    let mut chunks = Vec::new();
    for message in &messages {
        chunks.extend(encode_frame(message)?);
    }
    let response = call(channel, path, metadata, chunks).await?;
    Ok(Answers::new(response.into_body(), max_answer_bytes, Reader::Client))
}

/// A call's answers, as its client reads them.
pub type Answers<A> = Messages<A>;

/// A streaming call's requests, as its server reads them ([`server::serve_streaming`]).
pub type Requests<Q> = Messages<Q>;

/// The messages of one side of a call, each decoded from its body's DATA frames as they came (see
/// the module doc); an answer stream ends with the call's status from its trailers.
#[derive(Debug)]
pub struct Messages<M> {
    body: tonic::body::Body,
    messages: MessageReader,
    /// The body has ended (trailers, its end, or an error): nothing more will come.
    ended: bool,
    /// A message could not be read: the stream ends after that error.
    failed: bool,
    kind: PhantomData<fn() -> M>,
}

impl<M: Message + Default> Messages<M> {
    fn new(body: tonic::body::Body, max_bytes: usize, reader: Reader) -> Self {
        Self { body, messages: MessageReader::new(max_bytes, reader), ended: false, failed: false, kind: PhantomData }
    }

    /// The next message; `None` once the body ended well (for answers: with status OK); the
    /// call's status when it ended otherwise (the trailers' `grpc-status`, or the transport's
    /// failure), then `None`.
    pub async fn message(&mut self) -> Result<Option<M>, Status> {
        std::future::poll_fn(|context| self.poll_message(context)).await
    }

    fn poll_message(&mut self, context: &mut Context<'_>) -> Poll<Result<Option<M>, Status>> {
        if self.failed {
            return Poll::Ready(Ok(None));
        }
        let next = self.read_message(context);
        if let Poll::Ready(Err(_)) = next {
            self.failed = true;
        }
        next
    }

    fn read_message(&mut self, context: &mut Context<'_>) -> Poll<Result<Option<M>, Status>> {
        loop {
            if let Some(message) = self.messages.next()? {
                return Poll::Ready(Ok(Some(message)));
            }
            if self.ended {
                return Poll::Ready(Ok(None));
            }
            match std::task::ready!(http_body::Body::poll_frame(Pin::new(&mut self.body), context)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.messages.push(data),
                    Err(frame) => {
                        self.ended = true;
                        self.end(frame.into_trailers().ok().as_ref())?;
                    }
                },
                Some(Err(status)) => {
                    self.ended = true;
                    return Poll::Ready(Err(status));
                }
                None => {
                    self.ended = true;
                    self.end(None)?;
                }
            }
        }
    }

    /// The one answer of a unary call, once its status says OK: none, or a second, is a broken
    /// answer (INTERNAL).
    pub async fn single(self) -> Result<M, Status> {
        self.answer_first().await?.checked().await
    }

    /// The one answer of a unary call once it is whole; the status too when it came with it (then
    /// checked as [`Messages::single`] does), else the rest of the body to check later.
    pub async fn answer_first(mut self) -> Result<FirstAnswer<M>, Status> {
        let answer = self.message().await?.ok_or_else(|| Status::internal("the answer had no message"))?;
        // Whatever the frames read so far hold, without waiting for more.
        match self.poll_message(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(None)) => Ok(FirstAnswer { answer, rest: None }),
            Poll::Ready(Ok(Some(_))) => Err(more_than_one_answer()),
            Poll::Ready(Err(status)) => Err(status),
            Poll::Pending => Ok(FirstAnswer { answer, rest: Some(self) }),
        }
    }

    /// The rest of a unary call's body after its answer: OK once it ends with status OK; a second
    /// message is a broken answer (INTERNAL).
    pub async fn finish(mut self) -> Result<(), Status> {
        match self.message().await? {
            None => Ok(()),
            Some(_) => Err(more_than_one_answer()),
        }
    }

    /// The call's status at the end of its body: a message left unfinished is a broken one;
    /// trailers without `grpc-status` end a call well, as tonic takes them.
    fn end(&self, trailers: Option<&http::HeaderMap>) -> Result<(), Status> {
        if self.messages.is_partway() {
            return Err(self.messages.reader.ended_inside());
        }
        match trailers.and_then(Status::from_header_map) {
            Some(status) if status.code() != Code::Ok => Err(status),
            _ => Ok(()),
        }
    }
}

impl<M: Message + Default> futures_core::Stream for Messages<M> {
    type Item = Result<M, Status>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_message(context).map(Result::transpose)
    }
}

fn more_than_one_answer() -> Status {
    Status::internal("a unary call was answered with more than one message")
}

/// gRPC's code for an HTTP answer without `grpc-status` (gRPC's HTTP-to-gRPC status mapping, as
/// tonic applies it).
fn status_of_http(http_status: StatusCode) -> Status {
    let code = match http_status {
        StatusCode::BAD_REQUEST => Code::Internal,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(code, format!("grpc-status header missing, mapped from HTTP status code {}", http_status.as_u16()))
}

/// Sends one call's body of ready `chunks`; the response once its headers are in, or its status
/// when the server answered with headers alone.
async fn call(
    channel: &mut impl CallChannel,
    path: &'static str,
    metadata: tonic::metadata::MetadataMap,
    chunks: Vec<Bytes>,
) -> Result<http::Response<tonic::body::Body>, Status> {
    let mut http_request = http::Request::new(chunks);
    *http_request.method_mut() = Method::POST;
    *http_request.uri_mut() = Uri::from_static(path);
    *http_request.version_mut() = http::Version::HTTP_2;
    let headers = http_request.headers_mut();
    *headers = metadata.into_headers();
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));

    let response = channel.send(http_request).await?;
    // A failure before any message comes as headers alone ("trailers-only").
    if let Some(status) = Status::from_header_map(response.headers())
        && status.code() != Code::Ok
    {
        return Err(status);
    }
    if response.status() != StatusCode::OK {
        return Err(status_of_http(response.status()));
    }
    Ok(response)
}

/// Which end reads a message, which decides whose fault an unreadable one is: a server refuses
/// the caller's request (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNIMPLEMENTED, where tonic answers
/// INTERNAL and OUT_OF_RANGE); a client reports a bad answer with tonic's codes (INTERNAL,
/// OUT_OF_RANGE), so that callers classify it as they would one tonic decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    Server,
    Client,
}

impl Reader {
    fn compressed(self) -> Status {
        match self {
            Reader::Server => Status::unimplemented("compressed messages are not accepted: send them uncompressed"),
            Reader::Client => Status::internal("the answer is compressed, which was not asked for"),
        }
    }

    fn too_large(self, declared: usize, max_bytes: usize) -> Status {
        match self {
            Reader::Server => Status::resource_exhausted(format!(
                "the request's message is {declared} bytes, over the limit of {max_bytes}"
            )),
            Reader::Client => {
                Status::out_of_range(format!("the answer's message is {declared} bytes, over the limit of {max_bytes}"))
            }
        }
    }

    fn ended_inside(self) -> Status {
        match self {
            Reader::Server => Status::invalid_argument("the request is not a valid message: it ends inside itself"),
            Reader::Client => Status::internal("the answer ended inside a message"),
        }
    }

    fn malformed(self, error: prost::DecodeError) -> Status {
        match self {
            Reader::Server => Status::invalid_argument(format!("the request is not a valid message: {error}")),
            Reader::Client => Status::internal(format!("the answer is not a valid message: {error}")),
        }
    }
}

/// Length-prefixed gRPC messages read from DATA frames as they arrive, each decoded once its bytes
/// are in, its large fields slices of the frames ([`ChunkedBuf`]).
#[derive(Debug)]
struct MessageReader {
    frames: ChunkedBuf,
    /// The length the next message's prefix declared, once its prefix is in.
    length: Option<usize>,
    max_bytes: usize,
    reader: Reader,
}

impl MessageReader {
    fn new(max_bytes: usize, reader: Reader) -> Self {
        Self { frames: ChunkedBuf::default(), length: None, max_bytes, reader }
    }

    fn push(&mut self, data: Bytes) {
        self.frames.push(data);
    }

    /// Whether part of a message has arrived but not all of it.
    fn is_partway(&self) -> bool {
        self.frames.remaining() > 0
    }

    /// The next message if all its bytes are in; refuses one that is compressed, over the limit
    /// (from its prefix alone, before its bytes arrive) or malformed.
    fn next<M: Message + Default>(&mut self) -> Result<Option<M>, Status> {
        if self.length.is_none() && self.frames.remaining() >= GRPC_PREFIX_BYTES {
            let mut prefix = [0u8; GRPC_PREFIX_BYTES];
            self.frames.peek(&mut prefix);
            if prefix[0] != 0 {
                return Err(self.reader.compressed());
            }
            let declared = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
            if declared > self.max_bytes {
                return Err(self.reader.too_large(declared, self.max_bytes));
            }
            self.length = Some(declared);
        }
        match self.length {
            Some(length) if self.frames.remaining() >= GRPC_PREFIX_BYTES + length => {
                self.length = None;
                self.frames.advance(GRPC_PREFIX_BYTES);
                M::decode((&mut self.frames).take(length)).map(Some).map_err(|error| self.reader.malformed(error))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1;

    fn tensor(bytes: Bytes) -> v1::WireTensor {
        v1::WireTensor { dtype: 2, shape: vec![1, bytes.len() as u64 / 2], data: bytes }
    }

    #[test]
    fn a_frame_is_prosts_encoding_and_shares_the_large_payload() {
        let payload = Bytes::from((0..64 * 1024).map(|i| i as u8).collect::<Vec<_>>());
        let small = Bytes::from_static(&[7; 16]);
        let message = v1::ForwardRequest {
            request_id: 42,
            tokens: Some(v1::TokenRows {
                layer: 3,
                rows: Some(tensor(payload.clone())),
                offsets: small.clone(),
                experts: small.clone(),
                weights: small,
            }),
            ..Default::default()
        };
        let chunks = encode_frame(&message).expect("encodes");
        let joined: Vec<u8> = chunks.iter().flat_map(|chunk| chunk.iter().copied()).collect();
        let mut expected = vec![0u8];
        expected.extend_from_slice(&(message.encoded_len() as u32).to_be_bytes());
        expected.extend_from_slice(&message.encode_to_vec());
        assert_eq!(joined, expected);
        let shared: Vec<&Bytes> = chunks.iter().filter(|chunk| chunk.len() == payload.len()).collect();
        assert_eq!(shared.len(), 1, "the payload is one chunk of its own");
        assert_eq!(shared[0].as_ptr(), payload.as_ptr(), "and the same memory, not a copy");
    }

    /// Every answer (and then the end) a client reads from a response body of `frames` and
    /// `trailers`.
    fn answers(
        frames: Vec<Bytes>,
        trailers: Option<http::HeaderMap>,
    ) -> Vec<Result<Option<v1::ForwardResponse>, Status>> {
        let mut answers = response_of(frames, trailers);
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

    /// A call's answers as a client reads them from a response body of `frames` and `trailers`.
    fn response_of(frames: Vec<Bytes>, trailers: Option<http::HeaderMap>) -> Answers<v1::ForwardResponse> {
        Answers::new(tonic::body::Body::new(ChunkBody::new(frames, trailers)), 1 << 20, Reader::Client)
    }

    fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(future)
    }

    fn combined_answer(sequence: u32, payload: Bytes) -> v1::ForwardResponse {
        v1::ForwardResponse { sequence, combined: Some(tensor(payload)), ..Default::default() }
    }

    fn trailers(status: &'static str) -> Option<http::HeaderMap> {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static(status));
        trailers.insert("grpc-message", HeaderValue::from_static("worker%20stopped"));
        Some(trailers)
    }

    #[test]
    fn a_client_reads_answers_in_place_then_the_trailers_status() {
        let payloads: Vec<Bytes> =
            (0..2u8).map(|seed| Bytes::from((0..32 * 1024).map(|i| (i as u8) ^ seed).collect::<Vec<_>>())).collect();
        let sent: Vec<v1::ForwardResponse> =
            payloads.iter().enumerate().map(|(i, payload)| combined_answer(i as u32, payload.clone())).collect();
        let frames: Vec<Bytes> = sent.iter().flat_map(|answer| encode_frame(answer).expect("encodes")).collect();

        let read = answers(frames.clone(), trailers("0"));
        assert_eq!(read.len(), 3, "two answers, then the end");
        for ((answer, expected), payload) in read.iter().zip(&sent).zip(&payloads) {
            let answer = answer.as_ref().expect("read").as_ref().expect("an answer");
            assert_eq!(answer, expected);
            let data = &answer.combined.as_ref().expect("combined").data;
            assert_eq!(data.as_ptr(), payload.as_ptr(), "the frame's memory, not a copy");
        }
        assert!(matches!(read[2], Ok(None)), "status 0 ends the call well");

        let failed = answers(frames, trailers("14"));
        assert_eq!(failed.len(), 3);
        let status = failed[2].as_ref().unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::Unavailable, "worker stopped"));
    }

    #[test]
    fn answers_cut_into_any_frames_read_the_same() {
        let sent: Vec<v1::ForwardResponse> =
            (0..3).map(|i| combined_answer(i, Bytes::from(vec![i as u8 + 1; 5000]))).collect();
        let whole: Vec<u8> = sent.iter().flat_map(|answer| encode_frame(answer).expect("encodes").concat()).collect();
        for size in [1, 6, 4999, whole.len()] {
            let frames = whole.chunks(size).map(Bytes::copy_from_slice).collect();
            let read: Vec<v1::ForwardResponse> =
                answers(frames, None).into_iter().map_while(|answer| answer.expect("reads")).collect();
            assert_eq!(read, sent, "frames of {size} bytes");
        }
    }

    #[test]
    fn unreadable_answers_fail_with_tonics_codes() {
        let whole = encode_frame(&combined_answer(0, Bytes::from(vec![3; 100]))).expect("encodes").concat();
        let last = |frames: Vec<Bytes>| answers(frames, trailers("0")).pop().expect("an end").unwrap_err();
        let cut = last(vec![Bytes::copy_from_slice(&whole[..whole.len() - 1])]);
        assert_eq!((cut.code(), cut.message()), (Code::Internal, "the answer ended inside a message"));
        let mut large = whole[..GRPC_PREFIX_BYTES].to_vec();
        large[1..].copy_from_slice(&(2u32 << 20).to_be_bytes());
        assert_eq!(last(vec![Bytes::from(large)]).code(), Code::OutOfRange, "refused from its prefix alone");
        let mut compressed = whole.clone();
        compressed[0] = 1;
        assert_eq!(last(vec![Bytes::from(compressed)]).code(), Code::Internal);
        let mut garbage = whole[..GRPC_PREFIX_BYTES].to_vec();
        garbage[1..].copy_from_slice(&3u32.to_be_bytes());
        garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
        let malformed = last(vec![Bytes::from(garbage)]);
        assert_eq!(malformed.code(), Code::Internal);
        assert!(malformed.message().starts_with("the answer is not a valid message"), "{malformed:?}");
    }

    #[test]
    fn a_unary_call_takes_exactly_one_answer_then_its_status() {
        let frames = |count: u32| -> Vec<Bytes> {
            (0..count)
                .flat_map(|i| encode_frame(&combined_answer(i, Bytes::from(vec![7; 64]))).expect("encodes"))
                .collect()
        };
        let single = |count, status| block_on(response_of(frames(count), trailers(status)).single());

        assert_eq!(single(1, "0").expect("one answer").combined, combined_answer(0, Bytes::from(vec![7; 64])).combined);
        let twice = single(2, "0").unwrap_err();
        assert_eq!(
            (twice.code(), twice.message()),
            (Code::Internal, "a unary call was answered with more than one message")
        );
        let none = single(0, "0").unwrap_err();
        assert_eq!((none.code(), none.message()), (Code::Internal, "the answer had no message"));
        for count in [0, 1] {
            let failed = single(count, "14").unwrap_err();
            assert_eq!((failed.code(), failed.message()), (Code::Unavailable, "worker stopped"), "{count} answers");
        }
    }

    /// A body of ready chunks counts down the bytes it has left and ends once its trailers are out.
    #[test]
    fn a_chunk_body_counts_down_its_bytes_and_ends_after_its_trailers() {
        use http_body::Body;
        let mut body = ChunkBody::new(vec![Bytes::from_static(b"abc"), Bytes::from_static(b"defgh")], trailers("0"));
        let mut context = Context::from_waker(Waker::noop());
        let mut next = |body: &mut ChunkBody| match Pin::new(body).poll_frame(&mut context) {
            Poll::Ready(Some(Ok(frame))) => Some(frame),
            Poll::Ready(None) => None,
            Poll::Ready(Some(Err(never))) => match never {},
            Poll::Pending => panic!("a body of ready chunks never waits"),
        };
        let exact = |body: &ChunkBody| (body.size_hint().exact(), body.is_end_stream());
        assert_eq!(exact(&body), (Some(8), false));
        assert_eq!(next(&mut body).and_then(|frame| frame.into_data().ok()), Some(Bytes::from_static(b"abc")));
        assert_eq!(exact(&body), (Some(5), false));
        assert_eq!(next(&mut body).and_then(|frame| frame.into_data().ok()).map(|data| data.len()), Some(5));
        assert_eq!(exact(&body), (Some(0), false), "the trailers are still to go");
        assert!(next(&mut body).is_some_and(|frame| frame.is_trailers()));
        assert_eq!(exact(&body), (Some(0), true));
        assert!(next(&mut body).is_none());
    }

    /// A channel that records the request it is given and answers with `response`.
    struct Answering {
        response: Option<http::Response<tonic::body::Body>>,
        sent: Option<http::Request<Vec<Bytes>>>,
    }

    impl Answering {
        fn with(status: StatusCode, headers: &[(&'static str, &'static str)], body: ChunkBody) -> Self {
            let mut response = http::Response::new(tonic::body::Body::new(body));
            *response.status_mut() = status;
            for (name, value) in headers {
                response.headers_mut().insert(*name, HeaderValue::from_static(value));
            }
            Self { response: Some(response), sent: None }
        }
    }

    impl CallChannel for Answering {
        async fn send(
            &mut self,
            request: http::Request<Vec<Bytes>>,
        ) -> Result<http::Response<tonic::body::Body>, Status> {
            self.sent = Some(request);
            self.response.take().ok_or_else(|| Status::internal("asked twice"))
        }
    }

    fn forward_request() -> v1::ForwardRequest {
        v1::ForwardRequest { request_id: 9, sequence: 4, ..Default::default() }
    }

    /// A unary call sends its message as one gRPC frame with gRPC's headers to the method's path,
    /// and returns the one answer once the status after it is OK.
    #[test]
    fn a_unary_call_sends_its_message_and_returns_the_answer() {
        let answer = combined_answer(4, Bytes::from(vec![5; 300]));
        let frames = encode_frame(&answer).expect("encodes");
        let mut channel = Answering::with(StatusCode::OK, &[], ChunkBody::new(frames, trailers("0")));
        let path = "/switchyard.v1.ExpertWorker/Forward";
        let read: v1::ForwardResponse =
            block_on(unary(&mut channel, path, tonic::Request::new(forward_request()), 1 << 20)).expect("answered");
        assert_eq!(read, answer);
        let sent = channel.sent.expect("a request was sent");
        assert_eq!((sent.method(), sent.uri().path()), (&Method::POST, path));
        assert_eq!(sent.headers()[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(sent.headers()[header::TE], "trailers");
        assert_eq!(sent.body().concat(), encode_frame(&forward_request()).expect("encodes").concat());
    }

    /// A status in the response's headers alone is the call's error, and so is an HTTP error that
    /// carries no gRPC status (mapped as tonic maps it); an OK status there is no error.
    #[test]
    fn a_failure_in_the_headers_is_the_calls_error() {
        let call = |status, headers: &[(&'static str, &'static str)], body| {
            let mut channel = Answering::with(status, headers, body);
            block_on(unary::<_, _, v1::ForwardResponse>(
                &mut channel,
                "/switchyard.v1.ExpertWorker/Forward",
                tonic::Request::new(forward_request()),
                1 << 20,
            ))
        };
        let empty = || ChunkBody::new(Vec::new(), None);
        let refused =
            call(StatusCode::OK, &[("grpc-status", "14"), ("grpc-message", "draining")], empty()).unwrap_err();
        assert_eq!((refused.code(), refused.message()), (Code::Unavailable, "draining"));
        let unavailable = call(StatusCode::SERVICE_UNAVAILABLE, &[], empty()).unwrap_err();
        assert_eq!(unavailable.code(), Code::Unavailable);
        assert!(unavailable.message().ends_with("HTTP status code 503"), "{unavailable:?}");
        let answer = combined_answer(1, Bytes::from(vec![2; 8]));
        let body = ChunkBody::new(encode_frame(&answer).expect("encodes"), trailers("0"));
        assert_eq!(call(StatusCode::OK, &[("grpc-status", "0")], body).expect("an OK status is no error"), answer);
    }

    /// The answer size bound counts the message's own bytes: one of exactly the bound is read.
    #[test]
    fn an_answer_of_exactly_the_bound_is_read() {
        let answer = combined_answer(2, Bytes::from(vec![1; 1000]));
        let length = answer.encoded_len();
        let read = |max_bytes| {
            let frames = encode_frame(&answer).expect("encodes");
            let body = tonic::body::Body::new(ChunkBody::new(frames, trailers("0")));
            block_on(Answers::<v1::ForwardResponse>::new(body, max_bytes, Reader::Client).single())
        };
        assert_eq!(read(length).expect("at the bound"), answer);
        assert_eq!(read(length - 1).unwrap_err().code(), Code::OutOfRange);
    }

    /// A response body whose frames come as the test sends them.
    struct FramesAsSent(futures::channel::mpsc::UnboundedReceiver<http_body::Frame<Bytes>>);

    impl http_body::Body for FramesAsSent {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            context: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
            futures::StreamExt::poll_next_unpin(&mut self.0, context).map(|frame| frame.map(Ok))
        }
    }

    #[test]
    fn an_answer_is_taken_before_its_status_and_the_status_checked_after() {
        let payload = Bytes::from(vec![7; 64]);
        let answer_frames = || encode_frame(&combined_answer(3, payload.clone())).expect("encodes");
        let sent_answer = |after: Vec<http_body::Frame<Bytes>>| {
            let (sender, frames) = futures::channel::mpsc::unbounded();
            for chunk in answer_frames() {
                sender.unbounded_send(http_body::Frame::data(chunk)).expect("open");
            }
            let answers: Answers<v1::ForwardResponse> =
                Answers::new(tonic::body::Body::new(FramesAsSent(frames)), 1 << 20, Reader::Client);
            // Every frame of the answer is already in the channel, whose sender this thread still
            // holds: an answer that waits for more would never come, so it must be ready now.
            let first = futures::FutureExt::now_or_never(answers.answer_first())
                .expect("the answer is ready from the frames sent")
                .expect("the answer, without its status");
            assert_eq!(first.answer.sequence, 3);
            let rest = first.rest.expect("the status is still to come");
            for frame in after {
                sender.unbounded_send(frame).expect("open");
            }
            drop(sender);
            block_on(rest.finish())
        };
        let status = |code: &'static str| http_body::Frame::trailers(trailers(code).expect("trailers"));

        sent_answer(vec![status("0")]).expect("status OK");
        let failed = sent_answer(vec![status("14")]).unwrap_err();
        assert_eq!((failed.code(), failed.message()), (Code::Unavailable, "worker stopped"));
        let second = answer_frames().into_iter().map(http_body::Frame::data).chain([status("0")]).collect();
        assert_eq!(sent_answer(second).unwrap_err().code(), Code::Internal);

        // A status in the same read as the answer is checked with it.
        let together = block_on(response_of(answer_frames(), trailers("14")).answer_first()).unwrap_err();
        assert_eq!(together.code(), Code::Unavailable);
        let ended = block_on(response_of(answer_frames(), trailers("0")).answer_first()).expect("answered");
        assert!(ended.rest.is_none(), "nothing left to check");
    }

    #[test]
    fn an_http_error_without_a_grpc_status_maps_as_grpc_does() {
        let codes = [
            (StatusCode::BAD_REQUEST, Code::Internal),
            (StatusCode::UNAUTHORIZED, Code::Unauthenticated),
            (StatusCode::FORBIDDEN, Code::PermissionDenied),
            (StatusCode::NOT_FOUND, Code::Unimplemented),
            (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
            (StatusCode::BAD_GATEWAY, Code::Unavailable),
            (StatusCode::IM_A_TEAPOT, Code::Unknown),
        ];
        for (http_status, code) in codes {
            let status = status_of_http(http_status);
            assert_eq!(status.code(), code, "{http_status}");
            assert!(status.message().ends_with(http_status.as_str()), "{status:?}");
        }
    }

    #[test]
    fn small_fields_are_copied_into_one_chunk() {
        let message = v1::ForwardRequest { request_id: 1, ..Default::default() };
        let chunks = encode_frame(&message).expect("encodes");
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].len(), GRPC_PREFIX_BYTES + message.encoded_len());
    }
}
