//! Identity experts' token-major sums on a CPU, made from the request's wire rows in one pass:
//! each token's row decoded, scaled by the summed weights of the identity experts it chose, and
//! encoded as the answer (or kept in f32, to join a sum with computed parts).
//!
//! The arithmetic is libtorch's path exactly (an exact decode, one f32 product, encode rounded to
//! nearest even), without its full-size passes: the rows' upload copy, the f32 conversion into a
//! fresh tensor, the answer's conversion into another. On DeepEP's normal preset those made an
//! identity expert's "no compute" ~65 ms per 15 MiB request on this project's 2-core machine,
//! which is what its dispatch and combine figures share the cores with.

use bytes::Bytes;
use switchyard_proto::wire::{WireDtype, decode_rows_into, encode_row_to};

use crate::request::SharedRows;

/// `weights[t] · row t` of `rows`, encoded as `dtype`.
pub fn weighted_answer(rows: &SharedRows, weights: &[f32], dtype: WireDtype) -> Bytes {
    let row_bytes = dtype.row_bytes(rows.width);
    // Not `vec![0; len]`: reused heap memory (`switchyard_common::freed_buffers`) would be zeroed
    // in a pass of its own over megabytes, then written again. Each row is zeroed just before it
    // is encoded over, in cache.
    let mut answer = Vec::with_capacity(rows.tokens * row_bytes);
    let zeros = vec![0u8; row_bytes];
    each_weighted_row(rows, weights, |row| {
        let start = answer.len();
        answer.extend_from_slice(&zeros);
        encode_row_to(row, dtype, &mut answer[start..]);
    });
    Bytes::from(answer)
}

/// `weights[t] · row t` of `rows` in f32, `[tokens, width]` row-major.
pub fn weighted_values(rows: &SharedRows, weights: &[f32]) -> Vec<f32> {
    let mut values = Vec::with_capacity(rows.tokens * rows.width);
    each_weighted_row(rows, weights, |row| values.extend_from_slice(row));
    values
}

/// Hands `visit` each token's row of `rows` times its weight, through one reused row of f32.
fn each_weighted_row(rows: &SharedRows, weights: &[f32], mut visit: impl FnMut(&[f32])) {
    debug_assert_eq!(weights.len(), rows.tokens);
    let mut row = vec![0.0; rows.width];
    let row_bytes = rows.dtype.row_bytes(rows.width).max(1);
    for (bytes, weight) in rows.data.chunks_exact(row_bytes).zip(weights) {
        decode_rows_into(bytes, rows.width, rows.dtype, &mut row);
        row.iter_mut().for_each(|value| *value *= weight);
        visit(&row);
    }
}
