//! Tensor payloads on the wire: row-major, little-endian bytes of one of three element types.
//!
//! The client holds activations in f32; it may send them as f16 or bf16 to halve the bytes, and
//! the worker answers in the dtype the request asks for. These functions convert whole buffers at
//! once (one allocation per tensor, never per token).

use bytes::{Bytes, BytesMut};
use half::{bf16, f16};

use crate::v1::Dtype;

/// Bytes per element of `dtype`, or `None` for `DTYPE_UNSPECIFIED`.
pub fn element_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::Bf16 => Some(2),
        Dtype::Unspecified => None,
    }
}

/// Human name used in error messages and reports.
pub fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "f32",
        Dtype::F16 => "f16",
        Dtype::Bf16 => "bf16",
        Dtype::Unspecified => "unspecified",
    }
}

/// Appends `values` to `out` encoded as `dtype` (which must be specified).
///
/// The bytes are written into a slice grown once, not appended value by value: the per-value
/// capacity checks of `BufMut::put_*` kept the loop from vectorising and made bf16 encoding the
/// largest client cost of a 7168-wide dispatch.
pub fn encode_f32_into(values: &[f32], dtype: Dtype, out: &mut BytesMut) {
    let size = element_size(dtype).expect("encode_f32_into needs a specified dtype");
    let start = out.len();
    out.resize(start + values.len() * size, 0);
    let target = &mut out[start..];
    match dtype {
        Dtype::F32 => {
            for (chunk, value) in target.chunks_exact_mut(4).zip(values) {
                chunk.copy_from_slice(&value.to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (chunk, value) in target.chunks_exact_mut(2).zip(values) {
                chunk.copy_from_slice(&f16::from_f32(*value).to_bits().to_le_bytes());
            }
        }
        Dtype::Bf16 => {
            for (chunk, value) in target.chunks_exact_mut(2).zip(values) {
                chunk.copy_from_slice(&bf16::from_f32(*value).to_bits().to_le_bytes());
            }
        }
        Dtype::Unspecified => unreachable!("checked above"),
    }
}

/// Encodes `values` as `dtype` into a fresh buffer.
pub fn encode_f32(values: &[f32], dtype: Dtype) -> Bytes {
    let mut out = BytesMut::with_capacity(values.len() * element_size(dtype).unwrap_or(4));
    encode_f32_into(values, dtype, &mut out);
    out.freeze()
}

/// Decodes `bytes` of `dtype` into `out`, which must hold exactly `bytes.len() / element_size` values.
pub fn decode_into_f32(bytes: &[u8], dtype: Dtype, out: &mut [f32]) {
    match dtype {
        Dtype::F32 => {
            debug_assert_eq!(bytes.len(), out.len() * 4);
            for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
        Dtype::F16 => {
            debug_assert_eq!(bytes.len(), out.len() * 2);
            for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *value = f16::from_bits(u16::from_le_bytes([chunk[0], chunk[1]])).to_f32();
            }
        }
        Dtype::Bf16 => {
            debug_assert_eq!(bytes.len(), out.len() * 2);
            for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *value = bf16::from_bits(u16::from_le_bytes([chunk[0], chunk[1]])).to_f32();
            }
        }
        Dtype::Unspecified => panic!("decode_into_f32 needs a specified dtype"),
    }
}

/// Decodes a whole tensor into a fresh f32 vector.
pub fn decode_f32(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    let size = element_size(dtype).expect("decode_f32 needs a specified dtype");
    let mut out = vec![0.0; bytes.len() / size];
    decode_into_f32(bytes, dtype, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_is_exact() {
        let values = [0.0, -1.5, 3.25e-7, f32::MAX, -0.0];
        let bytes = encode_f32(&values, Dtype::F32);
        assert_eq!(bytes.len(), 20);
        assert_eq!(decode_f32(&bytes, Dtype::F32), values);
    }

    #[test]
    fn half_precision_round_trips_within_its_precision() {
        let values: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 0.173).collect();
        for (dtype, relative_step) in [(Dtype::F16, 1.0 / 1024.0), (Dtype::Bf16, 1.0 / 128.0)] {
            let bytes = encode_f32(&values, dtype);
            assert_eq!(bytes.len(), values.len() * 2);
            let decoded = decode_f32(&bytes, dtype);
            for (original, back) in values.iter().zip(&decoded) {
                assert!((original - back).abs() <= original.abs() * relative_step, "{dtype:?}: {original} -> {back}");
            }
        }
    }

    #[test]
    fn bytes_are_little_endian() {
        assert_eq!(&encode_f32(&[1.0], Dtype::F32)[..], &1.0f32.to_le_bytes());
        assert_eq!(&encode_f32(&[1.0], Dtype::Bf16)[..], &[0x80, 0x3f]);
    }
}
