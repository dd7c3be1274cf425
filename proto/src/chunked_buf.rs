//! Chunks of bytes read as one [`Buf`], none of them copied: the DATA frames a message arrived in
//! (decoded in place, [`Buf::copy_to_bytes`] sharing a range that lies within one frame), and a
//! message's chunks on their way out (its small fields and its uncopied rows), which HTTP/2 then
//! sends as one DATA frame, its head and every chunk in one vectored write; chunks sent as frames
//! of their own left in a write each, and on one host each write woke the receiver.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Chunks read in order, none of them empty.
#[derive(Debug, Default)]
pub struct ChunkedBuf {
    chunks: VecDeque<Bytes>,
    remaining: usize,
}

impl ChunkedBuf {
    /// Appends `chunk` after the bytes already held.
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.remaining += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Copies the first `into.len()` bytes without consuming them.
    pub fn peek(&self, into: &mut [u8]) {
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

impl FromIterator<Bytes> for ChunkedBuf {
    fn from_iter<I: IntoIterator<Item = Bytes>>(chunks: I) -> Self {
        let mut buf = Self::default();
        chunks.into_iter().for_each(|chunk| buf.push(chunk));
        buf
    }
}

impl Buf for ChunkedBuf {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |chunk| chunk.as_ref())
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
            // Within one chunk: a slice of it, not a copy.
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

    fn message() -> ChunkedBuf {
        [Bytes::from_static(b"head"), Bytes::new(), Bytes::from_static(b"rows of a message")].into_iter().collect()
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
        let mut peeked = [0u8; 7];
        buf.peek(&mut peeked);
        assert_eq!(&peeked, b"headrow");
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
