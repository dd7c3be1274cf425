//! A forward request or answer read from the HTTP/2 DATA frames it arrived in (`ChunkedBuf`, which
//! workers and clients decode in place) decodes exactly as from one contiguous buffer, wherever the
//! frames split it; and its tensor's bytes are a slice of a frame, not a copy, exactly where they
//! lie within one frame.
//!
//! Input: a count byte, that many frame lengths (a byte each, 1 to 256; the count taken modulo 16),
//! then the message's bytes, cut into frames of those lengths and a last frame with the rest.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchyard_proto::chunked_buf::ChunkedBuf;
use switchyard_proto::v1;

fuzz_target!(|input: &[u8]| {
    let Some((&count, rest)) = input.split_first() else { return };
    let (lengths, message) = rest.split_at(usize::from(count % 16).min(rest.len()));
    let message = Bytes::copy_from_slice(message);
    let frames = frames_of(&message, lengths);
    same_decode(&message, &frames, |request: &v1::ForwardRequest| {
        request.tokens.as_ref().and_then(|tokens| tokens.rows.as_ref()).map(|rows| rows.data.clone())
    });
    same_decode(&message, &frames, |answer: &v1::ForwardResponse| {
        answer.combined.as_ref().map(|combined| combined.data.clone())
    });
});

/// `message` cut after each of `lengths` (each byte + 1), the rest the last frame: slices of it.
fn frames_of(message: &Bytes, lengths: &[u8]) -> Vec<Bytes> {
    let mut frames = Vec::with_capacity(lengths.len() + 1);
    let mut start = 0;
    for length in lengths {
        let end = (start + usize::from(*length) + 1).min(message.len());
        frames.push(message.slice(start..end));
        start = end;
    }
    frames.push(message.slice(start..));
    frames
}

/// Decodes `message` whole and from `frames`: both refuse it, or both give the same message, whose
/// `tensor` bytes are shared from a frame where (and only where) they lie within one. Decoding the
/// whole `Bytes` shares every field, so its `tensor` shows where the bytes lie in `message`.
fn same_decode<M: Message + Default + PartialEq>(
    message: &Bytes,
    frames: &[Bytes],
    tensor: impl Fn(&M) -> Option<Bytes>,
) {
    let whole = M::decode(message.clone());
    let framed = M::decode(frames.iter().cloned().collect::<ChunkedBuf>());
    match (whole, framed) {
        (Ok(whole), Ok(framed)) => {
            assert!(whole == framed, "the frames decode to another message");
            let (Some(placed), Some(read)) = (tensor(&whole), tensor(&framed)) else { return };
            if placed.is_empty() {
                return;
            }
            let range = placed.as_ptr_range();
            let within_one = frames.iter().any(|frame| {
                let frame = frame.as_ptr_range();
                frame.start <= range.start && range.end <= frame.end
            });
            assert_eq!(read.as_ptr() == placed.as_ptr(), within_one, "shared exactly where it lies within a frame");
        }
        (Err(_), Err(_)) => {}
        (whole, framed) => panic!("decoded whole: {}, from frames: {}", whole.is_ok(), framed.is_ok()),
    }
}
