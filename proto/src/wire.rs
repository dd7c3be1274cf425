//! Tensor payloads on the wire: row-major, little-endian bytes of one of three element types.
//!
//! The client holds activations in f32; it may send them as f16 or bf16 to halve the bytes, and
//! the worker answers in the dtype the request asks for. These functions convert whole buffers at
//! once (one allocation per tensor, never per token).

use bytes::{Bytes, BytesMut};
use half::{bf16, f16};

use crate::v1::Dtype;

/// The element type of a tensor on the wire. The protocol's `DTYPE_UNSPECIFIED` has no
/// counterpart: it is refused where a message is read ([`TryFrom`]), so no code past the boundary
/// falls back to a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireDtype {
    F32 = 1,
    F16 = 2,
    Bf16 = 3,
}

/// A dtype field that names no element type; the value is what was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("dtype {0} is unspecified or unknown (expected f32, f16 or bf16)")]
pub struct UnknownDtype(pub i32);

impl WireDtype {
    pub const ALL: [WireDtype; 3] = [WireDtype::F32, WireDtype::F16, WireDtype::Bf16];

    /// Bytes per element.
    pub fn element_size(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::F16 | WireDtype::Bf16 => 2,
        }
    }

    /// The name used in flags, error messages and reports.
    pub fn name(self) -> &'static str {
        match self {
            WireDtype::F32 => "f32",
            WireDtype::F16 => "f16",
            WireDtype::Bf16 => "bf16",
        }
    }

    pub fn to_proto(self) -> Dtype {
        match self {
            WireDtype::F32 => Dtype::F32,
            WireDtype::F16 => Dtype::F16,
            WireDtype::Bf16 => Dtype::Bf16,
        }
    }
}

impl std::fmt::Display for WireDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WireDtype {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|dtype| dtype.name() == name)
            .ok_or_else(|| format!("unknown dtype '{name}' (expected f32, f16 or bf16)"))
    }
}

impl TryFrom<i32> for WireDtype {
    type Error = UnknownDtype;

    fn try_from(value: i32) -> Result<Self, Self::Error> {
        match Dtype::try_from(value) {
            Ok(Dtype::F32) => Ok(WireDtype::F32),
            Ok(Dtype::F16) => Ok(WireDtype::F16),
            Ok(Dtype::Bf16) => Ok(WireDtype::Bf16),
            _ => Err(UnknownDtype(value)),
        }
    }
}

/// Appends `values` to `out` encoded as `dtype`.
///
/// The bytes are written into a slice grown once, not appended value by value: the per-value
/// capacity checks of `BufMut::put_*` kept the loop from vectorising and made bf16 encoding the
/// largest client cost of a 7168-wide dispatch.
pub fn encode_f32_into(values: &[f32], dtype: WireDtype, out: &mut BytesMut) {
    let start = out.len();
    out.resize(start + values.len() * dtype.element_size(), 0);
    let target = &mut out[start..];
    match dtype {
        WireDtype::F32 => {
            for (chunk, value) in target.chunks_exact_mut(4).zip(values) {
                chunk.copy_from_slice(&value.to_le_bytes());
            }
        }
        WireDtype::F16 => {
            for (chunk, value) in target.chunks_exact_mut(2).zip(values) {
                chunk.copy_from_slice(&f16::from_f32(*value).to_bits().to_le_bytes());
            }
        }
        WireDtype::Bf16 => {
            for (chunk, value) in target.chunks_exact_mut(2).zip(values) {
                chunk.copy_from_slice(&bf16::from_f32(*value).to_bits().to_le_bytes());
            }
        }
    }
}

/// Encodes `values` as `dtype` into a fresh buffer.
pub fn encode_f32(values: &[f32], dtype: WireDtype) -> Bytes {
    let mut out = BytesMut::with_capacity(values.len() * dtype.element_size());
    encode_f32_into(values, dtype, &mut out);
    out.freeze()
}

/// Decodes `bytes` of `dtype` into `out`, which must hold exactly `bytes.len() / element_size` values.
pub fn decode_into_f32(bytes: &[u8], dtype: WireDtype, out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.element_size());
    match dtype {
        WireDtype::F32 => {
            for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
        WireDtype::F16 => {
            for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *value = f16::from_bits(u16::from_le_bytes([chunk[0], chunk[1]])).to_f32();
            }
        }
        WireDtype::Bf16 => {
            for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *value = bf16::from_bits(u16::from_le_bytes([chunk[0], chunk[1]])).to_f32();
            }
        }
    }
}

/// Decodes a whole tensor into a fresh f32 vector.
pub fn decode_f32(bytes: &[u8], dtype: WireDtype) -> Vec<f32> {
    let mut out = vec![0.0; bytes.len() / dtype.element_size()];
    decode_into_f32(bytes, dtype, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_is_exact() {
        let values = [0.0, -1.5, 3.25e-7, f32::MAX, -0.0];
        let bytes = encode_f32(&values, WireDtype::F32);
        assert_eq!(bytes.len(), 20);
        assert_eq!(decode_f32(&bytes, WireDtype::F32), values);
    }

    #[test]
    fn half_precision_round_trips_within_its_precision() {
        let values: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 0.173).collect();
        for (dtype, relative_step) in [(WireDtype::F16, 1.0 / 1024.0), (WireDtype::Bf16, 1.0 / 128.0)] {
            let bytes = encode_f32(&values, dtype);
            assert_eq!(bytes.len(), values.len() * 2);
            let decoded = decode_f32(&bytes, dtype);
            for (original, back) in values.iter().zip(&decoded) {
                assert!((original - back).abs() <= original.abs() * relative_step, "{dtype:?}: {original} -> {back}");
            }
        }
    }

    #[test]
    fn unspecified_is_refused_at_the_boundary() {
        assert_eq!(WireDtype::try_from(Dtype::Bf16 as i32), Ok(WireDtype::Bf16));
        assert_eq!(WireDtype::try_from(0), Err(UnknownDtype(0)));
        assert_eq!(
            WireDtype::try_from(9).unwrap_err().to_string(),
            "dtype 9 is unspecified or unknown (expected f32, f16 or bf16)"
        );
        assert_eq!("bf16".parse::<WireDtype>(), Ok(WireDtype::Bf16));
        assert!(WireDtype::ALL.iter().all(|dtype| dtype.name().parse::<WireDtype>() == Ok(*dtype)));
    }

    #[test]
    fn bytes_are_little_endian() {
        assert_eq!(&encode_f32(&[1.0], WireDtype::F32)[..], &1.0f32.to_le_bytes());
        assert_eq!(&encode_f32(&[1.0], WireDtype::Bf16)[..], &[0x80, 0x3f]);
    }
}
