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
//! the server's half: a handler's answer goes out the same way.

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
        let (parts, body) = request.into_parts();
        let decoder = tonic_prost::ProstCodec::<(), Q>::default().decoder();
        let mut messages = Streaming::new_request(decoder, body, None, Some(max_request_bytes));
        let message = messages
            .message()
            .await
            .map_err(unreadable)?
            .ok_or_else(|| Status::invalid_argument("the request had no message"))?;
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

/// gRPC's codes for a request that cannot be read, where tonic's differ: a malformed message is the
/// caller's INVALID_ARGUMENT (tonic: INTERNAL), one over the size limit RESOURCE_EXHAUSTED (tonic:
/// OUT_OF_RANGE).
fn unreadable(status: Status) -> Status {
    match status.code() {
        Code::Internal => Status::invalid_argument(format!("the request is not a valid message: {}", status.message())),
        Code::OutOfRange => Status::resource_exhausted(status.message().to_owned()),
        _ => status,
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

    #[test]
    fn small_fields_are_copied_into_one_chunk() {
        let message = v1::ForwardRequest { request_id: 1, ..Default::default() };
        let chunks = encode_frame(&message).expect("encodes");
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].len(), GRPC_PREFIX_BYTES + message.encoded_len());
    }
}
