//! Moving rows between the caller's `[tokens, d_model]` f32 buffer and wire payloads: gather the
//! rows one expert needs into one contiguous payload; decode an expert's answer and add it, scaled
//! by the gate weights, into the output. One buffer per expert, never one per token.

use bytes::{Bytes, BytesMut};
use switchyard_proto::wire::{self, WireDtype};

/// The rows `tokens` of `hidden`, encoded as `dtype`, back to back.
pub fn gather_rows(hidden: &[f32], d_model: usize, tokens: &[u32], dtype: WireDtype) -> Bytes {
    let mut payload = BytesMut::with_capacity(tokens.len() * dtype.row_bytes(d_model));
    for token in tokens {
        let start = *token as usize * d_model;
        wire::encode_row_into(&hidden[start..start + d_model], dtype, &mut payload);
    }
    payload.freeze()
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
        let payload = gather_rows(&hidden, 2, &[2, 0], WireDtype::F32);
        let mut rows = Vec::new();
        decode_rows(&payload, 2, WireDtype::F32, &mut rows);
        assert_eq!(rows, [5.0, 6.0, 1.0, 2.0]);
        let mut y = vec![0.0; 6];
        accumulate(&mut y, 2, &[2, 0], &[0.5, 2.0], &rows);
        assert_eq!(y, [2.0, 4.0, 0.0, 0.0, 2.5, 3.0]);
    }
}
