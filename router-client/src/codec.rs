//! Moving rows between the caller's `[tokens, d_model]` f32 buffer and wire payloads: gather the
//! rows one expert needs into one contiguous payload; decode an expert's answer and add it, scaled
//! by the gate weights, into the output. One buffer per expert, never one per token.

use std::mem::MaybeUninit;

use bytes::Bytes;
use switchyard_proto::wire::{self, WireDtype};

use crate::cpu::on_scoped_threads;

/// Payloads of at least this many bytes per thread are encoded by several threads at once.
const SPLIT_PAYLOAD_BYTES: usize = 4 << 20;

/// The rows `tokens` of `hidden`, encoded as `dtype`, back to back; a large payload encoded by up
/// to `threads` threads at once, each its share of the rows.
#[allow(unsafe_code)]
pub fn gather_rows(hidden: &[f32], d_model: usize, tokens: &[u32], dtype: WireDtype, threads: usize) -> Bytes {
    let row_bytes = dtype.row_bytes(d_model).max(1);
    let len = tokens.len() * row_bytes;
    // Not `vec![0; len]`: reused heap memory (`switchyard_common::freed_buffers`) would be zeroed
    // in a pass of its own over megabytes, then written again. Each row is zeroed just before it
    // is encoded over, in cache.
    let mut payload: Vec<u8> = Vec::with_capacity(len);
    let encode = |(tokens, rows): (&[u32], &mut [MaybeUninit<u8>])| {
        let zeros = vec![0u8; row_bytes];
        for (token, target) in tokens.iter().zip(rows.chunks_exact_mut(row_bytes)) {
            let start = *token as usize * d_model;
            wire::encode_row_to(&hidden[start..start + d_model], dtype, target.write_copy_of_slice(&zeros));
        }
    };
    let threads = threads.min(len / SPLIT_PAYLOAD_BYTES).min(tokens.len()).max(1);
    let per_thread = tokens.len().div_ceil(threads).max(1);
    let rows = payload.spare_capacity_mut()[..len].chunks_mut(per_thread * row_bytes);
    on_scoped_threads(tokens.chunks(per_thread).zip(rows), encode);
    // SAFETY: the capacity is `len`, and the threads above wrote each of its bytes: row by row,
    // `tokens.len()` rows of `row_bytes`, each through `write_copy_of_slice` before its encode.
    unsafe { payload.set_len(len) };
    Bytes::from(payload)
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

/// `y[token] += row` for each row of `rows`: a worker's per-token sums, already weighted.
pub fn add_rows(y: &mut [f32], d_model: usize, tokens: &[u32], rows: &[f32]) {
    for (token, row) in tokens.iter().zip(rows.chunks_exact(d_model)) {
        let start = *token as usize * d_model;
        for (out, value) in y[start..start + d_model].iter_mut().zip(row) {
            *out += value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
