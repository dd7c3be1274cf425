//! Moving rows between the caller's `[tokens, d_model]` f32 buffer and wire payloads: gather the
//! rows one expert needs into one contiguous payload; decode an expert's answer and add it, scaled
//! by the gate weights, into the output. One buffer per expert, never one per token.

use std::mem::MaybeUninit;

use bytes::Bytes;
use switchyard_proto::wire::{self, WireDtype};

use crate::cpu::{chunks_for, in_turns};

/// Payloads of at least this many bytes per thread are encoded by several threads at once.
const SPLIT_PAYLOAD_BYTES: usize = 4 << 20;

/// The rows `tokens` of `hidden`, encoded as `dtype`, back to back; a large payload encoded by up
/// to `threads` threads at once, each its share of the rows.
pub fn gather_rows(hidden: &[f32], d_model: usize, tokens: &[u32], dtype: WireDtype, threads: usize) -> Bytes {
    gather_requests(hidden, d_model, &[tokens], dtype, threads).pop().unwrap_or_default()
}

/// [`gather_rows`] of each of `requests`, all of them encoded together by up to `threads` threads
/// taking shares of all their rows in turns: a worker's dispatch split into several requests (one
/// per connection, each a few MB) is encoded at the pace of the threads, not of one.
#[allow(unsafe_code)]
pub fn gather_requests(
    hidden: &[f32],
    d_model: usize,
    requests: &[&[u32]],
    dtype: WireDtype,
    threads: usize,
) -> Vec<Bytes> {
    let row_bytes = dtype.row_bytes(d_model).max(1);
    // Not `vec![0; len]`: reused heap memory (`switchyard_common::freed_buffers`) would be zeroed
    // in a pass of its own over megabytes, then written again. Each row is zeroed just before it
    // is encoded over, in cache.
    let mut payloads: Vec<Vec<u8>> =
        requests.iter().map(|tokens| Vec::with_capacity(tokens.len() * row_bytes)).collect();
    let total_rows: usize = requests.iter().map(|tokens| tokens.len()).sum();
    let (threads, per_share) = encode_shares(total_rows, row_bytes, threads);
    let shares = split_rows(
        requests.iter().zip(&mut payloads).map(|(tokens, payload)| {
            let rows = &mut payload.spare_capacity_mut()[..tokens.len() * row_bytes];
            (*tokens, rows)
        }),
        row_bytes,
        per_share,
    );
    in_turns(threads, shares.into_iter(), |share| {
        let zeros = vec![0u8; row_bytes];
        for (tokens, rows) in share {
            for (token, target) in tokens.iter().zip(rows.chunks_exact_mut(row_bytes)) {
                let start = *token as usize * d_model;
                wire::encode_row_to(&hidden[start..start + d_model], dtype, target.write_copy_of_slice(&zeros));
            }
        }
    });
    payloads
        .into_iter()
        .zip(requests)
        .map(|(mut payload, tokens)| {
            // SAFETY: the capacity is `tokens.len() * row_bytes`, and the shares above, which
            // cover every row of every request once, wrote each of its bytes: row by row, each
            // through `write_copy_of_slice` before its encode.
            unsafe { payload.set_len(tokens.len() * row_bytes) };
            Bytes::from(payload)
        })
        .collect()
}

/// The threads worth encoding `rows` rows of `row_bytes` bytes with, at most `threads`, and the
/// rows of each share they take in turns ([`chunks_for`]).
fn encode_shares(rows: usize, row_bytes: usize, threads: usize) -> (usize, usize) {
    let threads = threads.min(rows * row_bytes / SPLIT_PAYLOAD_BYTES).min(rows).max(1);
    (threads, rows.div_ceil(chunks_for(threads)))
}

/// Tokens and the payload bytes their rows are encoded into.
type Run<'a> = (&'a [u32], &'a mut [MaybeUninit<u8>]);

/// The runs of `requests`, in order, dealt into shares of `per_share` rows each (the last one
/// shorter): a run that crosses a share's end is cut there.
fn split_rows<'a>(
    requests: impl IntoIterator<Item = Run<'a>>,
    row_bytes: usize,
    per_share: usize,
) -> Vec<Vec<Run<'a>>> {
    let mut shares = vec![Vec::new()];
    let mut room = per_share;
    for (mut tokens, mut rows) in requests {
        while !tokens.is_empty() {
            if room == 0 {
                shares.push(Vec::new());
                room = per_share;
            }
            let taken = room.min(tokens.len());
            let (head_tokens, tail_tokens) = tokens.split_at(taken);
            let (head_rows, tail_rows) = rows.split_at_mut(taken * row_bytes);
            shares.last_mut().expect("one share at least").push((head_tokens, head_rows));
            (tokens, rows, room) = (tail_tokens, tail_rows, room - taken);
        }
    }
    shares
}

/// Decodes `payload`, rows of `d_model`, into `scratch` (resized, reused across experts of one call).
pub fn decode_rows(payload: &[u8], d_model: usize, dtype: WireDtype, scratch: &mut Vec<f32>) {
    scratch.resize(payload.len() / dtype.row_bytes(d_model).max(1) * d_model, 0.0);
    wire::decode_rows_into(payload, d_model, dtype, scratch);
}

/// `y[token] += weight * row` for each row of `rows`.
pub fn accumulate(y: &mut [f32], d_model: usize, tokens: &[u32], weights: &[f32], rows: &[f32]) {
    for ((token, weight), row) in tokens.iter().zip(weights).zip(rows.chunks_exact(d_model)) {
        let start = *token as usize * d_model;
        for (out, value) in y[start..start + d_model].iter_mut().zip(row) {
            *out += weight * value;
        }
    }
}

/// `y[token] += row` for each row of `rows`: a worker's per-token sums, already weighted. `y`
/// starts at value `y_start` of the whole output (a thread's own range of it).
pub fn add_rows_from(y: &mut [f32], y_start: usize, d_model: usize, tokens: &[u32], rows: &[f32]) {
    for (token, row) in tokens.iter().zip(rows.chunks_exact(d_model)) {
        let start = *token as usize * d_model - y_start;
        for (out, value) in y[start..start + d_model].iter_mut().zip(row) {
            *out += value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From 4 MiB of payload a thread, every thread taking 4 shares in turns; one thread takes all.
    #[test]
    fn a_payload_is_encoded_in_shares_of_megabytes() {
        const MIB: usize = 1 << 20;
        assert_eq!(encode_shares(100, MIB, 1), (1, 100), "one thread: one share");
        assert_eq!(encode_shares(100, MIB, 2), (2, 13), "8 shares of 100 rows");
        assert_eq!(encode_shares(100, MIB, 8), (8, 4), "32 shares");
        assert_eq!(encode_shares(8, MIB, 8), (2, 1), "8 MiB: 2 threads");
        assert_eq!(encode_shares(3, MIB, 8), (1, 3), "3 MiB: not worth a second thread");
        assert_eq!(encode_shares(1, 64 * MIB, 8), (1, 1), "one row is not split");
        assert_eq!(encode_shares(0, MIB, 8), (1, 0));
    }

    #[test]
    fn gather_then_accumulate_scatters_back_with_weights() {
        let hidden = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let payload = gather_rows(&hidden, 2, &[2, 0], WireDtype::F32, 1);
        let mut rows = Vec::new();
        decode_rows(&payload, 2, WireDtype::F32, &mut rows);
        assert_eq!(rows, [5.0, 6.0, 1.0, 2.0]);
        let mut y = vec![0.0; 6];
        accumulate(&mut y, 2, &[2, 0], &[0.5, 2.0], &rows);
        assert_eq!(y, [2.0, 4.0, 0.0, 0.0, 2.5, 3.0]);
    }

    #[test]
    fn a_large_payload_encoded_by_several_threads_is_the_same_bytes() {
        let (rows, d_model) = (4099, 2048);
        let hidden: Vec<f32> = (0..rows * d_model).map(|i| ((i * 7919) % 4001) as f32 / 1000.0 - 2.0).collect();
        let tokens: Vec<u32> = (0..rows as u32).rev().step_by(2).chain((0..rows as u32).step_by(3)).collect();
        for dtype in [WireDtype::F32, WireDtype::Bf16] {
            let alone = gather_rows(&hidden, d_model, &tokens, dtype, 1);
            assert!(alone.len() >= 2 * SPLIT_PAYLOAD_BYTES, "{dtype}: large enough to split");
            assert_eq!(gather_rows(&hidden, d_model, &tokens, dtype, 3), alone, "{dtype}");
        }
    }

    /// A worker's dispatch in several requests, each too small to split alone, is encoded by
    /// several threads together, into the same bytes each request has encoded alone.
    #[test]
    fn requests_encoded_together_are_each_the_bytes_encoded_alone() {
        let (rows, d_model) = (3001, 2048);
        let hidden: Vec<f32> = (0..rows * d_model).map(|i| ((i * 7919) % 4001) as f32 / 1000.0 - 2.0).collect();
        let tokens: Vec<u32> = (0..rows as u32).rev().collect();
        let requests: Vec<&[u32]> = vec![&tokens[..700], &tokens[700..1400], &[], &tokens[1400..]];
        for dtype in [WireDtype::F32, WireDtype::Bf16] {
            let together = gather_requests(&hidden, d_model, &requests, dtype, 4);
            assert_eq!(together.len(), requests.len());
            for (payload, request) in together.iter().zip(&requests) {
                assert_eq!(*payload, gather_rows(&hidden, d_model, request, dtype, 1), "{dtype}");
            }
        }
    }

    /// Shares take whole runs while they fit and cut a run at a share's end; every row lands in
    /// exactly one share, in order.
    #[test]
    fn rows_are_dealt_into_equal_shares_across_requests() {
        let tokens: Vec<u32> = (0..10).collect();
        let mut targets = [MaybeUninit::<u8>::uninit(); 10 * 2];
        let (first, rest) = targets.split_at_mut(3 * 2);
        let requests = vec![(&tokens[..3], first), (&tokens[3..], rest)];
        let shares = split_rows(requests, 2, 4);
        let runs: Vec<Vec<(Vec<u32>, usize)>> = shares
            .iter()
            .map(|share| share.iter().map(|(tokens, rows)| (tokens.to_vec(), rows.len())).collect())
            .collect();
        assert_eq!(runs, [vec![(vec![0, 1, 2], 6), (vec![3], 2)], vec![(vec![4, 5, 6, 7], 8)], vec![(vec![8, 9], 4)],]);
    }
}
