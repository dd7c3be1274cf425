//! Unary gRPC calls whose large `bytes` fields go to the socket as the [`Bytes`] they are.
//!
//! Tonic's client encodes every message into one contiguous buffer, so each tensor payload was
//! copied once more on its way out (a fresh multi-megabyte buffer per request, page faults
//! included). Here a message is encoded as a list of chunks instead: prost writes tags, lengths and
//! small fields into a small buffer, and every `bytes` field of at least [`SHARED_FIELD_BYTES`] is
//! taken as a slice of the caller's `Bytes` (prost hands `Bytes` fields to [`BufMut::put`], and
//! `Bytes::copy_to_bytes` shares instead of copying). The chunks are the request's HTTP/2 body
//! as they are; hyper writes them with vectored writes. The answer is decoded by tonic's own
//! decoder, so status, trailers and limits behave as with a generated client. [`serve_unary`] is
//! the server's half: a handler's answer goes out the same way, and the request is decoded from
//! its DATA frames in place, its large fields slices of the frames they arrived in.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::buf::UninitSlice;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tonic::codec::{Codec, Streaming};
use tonic::codegen::http::{self, HeaderValue, Method, Uri, header};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower::{Service, ServiceExt};

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

/// Calls the unary method `path` (`/package.Service/Method`) on `channel` with `request`, sending
/// its payloads without a copy ([`encode_frame`]); the request's metadata (a `grpc-timeout` set by
/// [`tonic::Request::set_timeout`] included) goes as headers. `max_answer_bytes` bounds the answer
/// as `max_decoding_message_size` does.
pub async fn unary<Q, A>(
    channel: &mut Channel,
    path: &'static str,
    request: tonic::Request<Q>,
    max_answer_bytes: usize,
) -> Result<A, Status>
where
    Q: Message,
    A: Message + Default + Send + Sync + 'static,
{
    let mut answers = streaming(channel, path, request.map(|message| vec![message]), max_answer_bytes).await?;
    let answer = answers.message().await?.ok_or_else(|| Status::internal("the answer had no message"))?;
    answers.trailers().await?;
    Ok(answer)
}

/// Calls method `path` with `messages` sent in order on one stream, each uncopied ([`encode_frame`]);
/// the worker reads each as its bytes complete. Returns the answers' stream once the server has
/// answered with headers (a trailers-only failure is returned as the error).
pub async fn streaming<Q, A>(
    channel: &mut Channel,
    path: &'static str,
    request: tonic::Request<Vec<Q>>,
    max_answer_bytes: usize,
) -> Result<Streaming<A>, Status>
where
    Q: Message,
    A: Message + Default + Send + Sync + 'static,
{
    let (metadata, _, messages) = request.into_parts();
    let mut chunks = Vec::new();
    for message in &messages {
        chunks.extend(encode_frame(message)?);
    }
    let response = call(channel, path, metadata, chunks).await?;
    let status_code = response.status();
    let decoder = tonic_prost::ProstCodec::<(), A>::default().decoder();
    Ok(Streaming::new_response(decoder, response.into_body(), status_code, None, Some(max_answer_bytes)))
}

/// Sends one call's body of ready `chunks`; the response once its headers are in, or its status
/// when the server answered with headers alone.
async fn call(
    channel: &mut Channel,
    path: &'static str,
    metadata: tonic::metadata::MetadataMap,
    chunks: Vec<Bytes>,
) -> Result<http::Response<tonic::body::Body>, Status> {
    let body = tonic::body::Body::new(ChunkBody::new(chunks, None));
    let mut http_request = http::Request::new(body);
    *http_request.method_mut() = Method::POST;
    *http_request.uri_mut() = Uri::from_static(path);
    *http_request.version_mut() = http::Version::HTTP_2;
    let headers = http_request.headers_mut();
    *headers = metadata.into_headers();
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));

    let response = channel.ready().await.map_err(|error| Status::from_error(error.into()))?;
    let response = response.call(http_request).await.map_err(|error| Status::from_error(error.into()))?;
    // A failure before any message comes as headers alone ("trailers-only").
    if let Some(status) = Status::from_header_map(response.headers())
        && status.code() != Code::Ok
    {
        return Err(status);
    }
    Ok(response)
}

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
        let (parts, mut body) = request.into_parts();
        let message = read_message(&mut body, max_request_bytes).await?;
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
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let mut response = http::Response::new(tonic::body::Body::new(ChunkBody::new(chunks, Some(trailers))));
            *response.headers_mut() = metadata.into_headers();
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            response
        }
        Err(status) => status.into_http(),
    }
}

/// Reads the one message of a unary request's `body` (at most `max_bytes`) and decodes it from the
/// HTTP/2 DATA frames as they came: a `bytes` field that arrived within one frame (a payload its
/// sender wrote as one chunk, up to the frame size) is a slice of that frame. Tonic's decoder
/// copies every frame into one buffer first, a copy of every row a worker receives. A malformed
/// message is the caller's INVALID_ARGUMENT, one over the limit RESOURCE_EXHAUSTED (tonic answers
/// INTERNAL and OUT_OF_RANGE); a failing body (the worker's receiving budget) keeps its own status.
async fn read_message<Q: Message + Default>(body: &mut tonic::body::Body, max_bytes: usize) -> Result<Q, Status> {
    let mut frames = Frames::default();
    let mut length = None;
    loop {
        if length.is_none() && frames.remaining() >= GRPC_PREFIX_BYTES {
            let mut prefix = [0u8; GRPC_PREFIX_BYTES];
            frames.peek(&mut prefix);
            if prefix[0] != 0 {
                return Err(Status::unimplemented("compressed messages are not accepted: send them uncompressed"));
            }
            let declared = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
            if declared > max_bytes {
                return Err(Status::resource_exhausted(format!(
                    "the request's message is {declared} bytes, over the limit of {max_bytes}"
                )));
            }
            length = Some(declared);
        }
        if let Some(length) = length
            && frames.remaining() >= GRPC_PREFIX_BYTES + length
        {
            frames.advance(GRPC_PREFIX_BYTES);
            return Q::decode(frames.take(length))
                .map_err(|error| Status::invalid_argument(format!("the request is not a valid message: {error}")));
        }
        match std::future::poll_fn(|context| http_body::Body::poll_frame(Pin::new(&mut *body), context)).await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    frames.push(data);
                }
            }
            Some(Err(status)) => return Err(status),
            None if frames.remaining() == 0 => return Err(Status::invalid_argument("the request had no message")),
            None => return Err(Status::invalid_argument("the request is not a valid message: it ends inside itself")),
        }
    }
}

/// Received DATA frames read as one buffer; [`Buf::copy_to_bytes`] shares a range that lies within
/// one frame instead of copying it.
#[derive(Debug, Default)]
struct Frames {
    chunks: VecDeque<Bytes>,
    remaining: usize,
}

impl Frames {
    fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.remaining += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Copies the first `into.len()` bytes without consuming them.
    fn peek(&self, into: &mut [u8]) {
        let mut filled = 0;
        for chunk in &self.chunks {
            let take = (into.len() - filled).min(chunk.len());
            into[filled..filled + take].copy_from_slice(&chunk[..take]);
            filled += take;
            if filled == into.len() {
                break;
            }
        }
    }
}

impl Buf for Frames {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |chunk| chunk.as_ref())
    }

    fn advance(&mut self, mut count: usize) {
        assert!(count <= self.remaining, "advance past the end of the frames");
        self.remaining -= count;
        while count > 0 {
            let front = self.chunks.front_mut().expect("counted");
            if count < front.len() {
                front.advance(count);
                return;
            }
            count -= front.len();
            self.chunks.pop_front();
        }
    }

    fn copy_to_bytes(&mut self, length: usize) -> Bytes {
        match self.chunks.front_mut() {
            Some(front) if front.len() >= length => {
                let shared = front.split_to(length);
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                self.remaining -= length;
                shared
            }
            _ => {
                let mut copied = BytesMut::with_capacity(length);
                copied.put((&mut *self).take(length));
                copied.freeze()
            }
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

    /// What `serve_unary` reads from a request whose body came as `frames`.
    fn read(frames: Vec<Bytes>, max_bytes: usize) -> Result<v1::ForwardRequest, Status> {
        let mut body = tonic::body::Body::new(ChunkBody::new(frames, None));
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(read_message(&mut body, max_bytes))
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
    fn small_fields_are_copied_into_one_chunk() {
        let message = v1::ForwardRequest { request_id: 1, ..Default::default() };
        let chunks = encode_frame(&message).expect("encodes");
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].len(), GRPC_PREFIX_BYTES + message.encoded_len());
    }
}
