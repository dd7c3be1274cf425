//! A message's chunks (its small fields and its uncopied rows) as one [`Buf`], so that HTTP/2
//! sends them as one DATA frame: h2 writes a frame's head and its payload's chunks in one vectored
//! write, where chunks sent as frames of their own left in a write each, and on one host each
//! write wakes the receiver (a request's small fields woke the worker to read a few KiB, then its
//! rows a second time).

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes};

/// Chunks read in order, none of them empty.
#[derive(Debug, Default)]
pub struct MessageBuf {
    chunks: VecDeque<Bytes>,
    remaining: usize,
}

impl MessageBuf {
    pub fn new(chunks: impl IntoIterator<Item = Bytes>) -> Self {
        let chunks: VecDeque<Bytes> = chunks.into_iter().filter(|chunk| !chunk.is_empty()).collect();
        let remaining = chunks.iter().map(Bytes::len).sum();
        Self { chunks, remaining }
    }
}

impl Buf for MessageBuf {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |chunk| chunk)
    }

    fn advance(&mut self, mut count: usize) {
        assert!(count <= self.remaining, "advanced {count} bytes past the {} left", self.remaining);
        self.remaining -= count;
        while count > 0 {
            let front = self.chunks.front_mut().expect("count is within the chunks left");
            if count < front.len() {
                front.advance(count);
                return;
            }
            count -= front.len();
            self.chunks.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut filled = 0;
        for (slice, chunk) in slices.iter_mut().zip(&self.chunks) {
            *slice = IoSlice::new(chunk);
            filled += 1;
        }
        filled
    }

    fn copy_to_bytes(&mut self, length: usize) -> Bytes {
        match self.chunks.front_mut() {
            // The common case (h2 splitting a frame inside a chunk): a slice, not a copy.
            Some(front) if length <= front.len() => {
                let taken = front.split_to(length);
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                self.remaining -= length;
                taken
            }
            _ => {
                let mut copied = bytes::BytesMut::with_capacity(length);
                copied.put((&mut *self).take(length));
                copied.freeze()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> MessageBuf {
        MessageBuf::new([Bytes::from_static(b"head"), Bytes::new(), Bytes::from_static(b"rows of a message")])
    }

    #[test]
    fn reads_its_chunks_in_order_across_their_boundaries() {
        let mut buf = message();
        assert_eq!(buf.remaining(), 21);
        buf.advance(2);
        assert_eq!(buf.chunk(), b"ad");
        buf.advance(3);
        assert_eq!(buf.chunk(), b"ows of a message");
        assert_eq!(buf.copy_to_bytes(4), Bytes::from_static(b"ows "));
        let rest = buf.copy_to_bytes(buf.remaining());
        assert_eq!(rest, Bytes::from_static(b"of a message"));
        assert!(!buf.has_remaining() && buf.chunk().is_empty());
    }

    #[test]
    fn a_copy_across_chunks_takes_from_each() {
        let mut buf = message();
        assert_eq!(buf.copy_to_bytes(7), Bytes::from_static(b"headrow"));
        assert_eq!(buf.remaining(), 14);
        assert_eq!(buf.chunk(), b"s of a message");
    }

    #[test]
    fn offers_every_chunk_to_one_vectored_write() {
        let mut buf = message();
        buf.advance(1);
        let mut slices = [IoSlice::new(&[]); 4];
        let filled = buf.chunks_vectored(&mut slices);
        let written: Vec<&[u8]> = slices[..filled].iter().map(|slice| &slice[..]).collect();
        assert_eq!(written, [&b"ead"[..], &b"rows of a message"[..]], "the empty chunk is skipped");
        let mut one = [IoSlice::new(&[])];
        assert_eq!(buf.chunks_vectored(&mut one), 1);
        assert_eq!(&one[0][..], b"ead");
    }

    #[test]
    #[should_panic(expected = "past the")]
    fn advancing_past_the_end_is_a_bug() {
        message().advance(22);
    }
}
