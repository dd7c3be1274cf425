//! Tensor payloads on the wire: `[rows, width]` row-major, little-endian, in one of four formats.
//!
//! The client holds activations in f32; it may send them as f16 or bf16 to halve the bytes, or as
//! FP8 to quarter them (dispatch only, as DeepEP does), and the worker answers in the dtype the
//! request asks for. These functions convert whole rows or tensors at once (one allocation per
//! tensor, never per token).
//!
//! FP8 rows are DeepEP's dispatch format: each row's values as e4m3 (the OCP "fn" variant torch
//! calls `float8_e4m3fn`: no infinities, largest finite 448), scaled per block of [`FP8_BLOCK`]
//! values so that the block's largest magnitude maps to 448, followed by the row's block scales as
//! f32. A row is self-contained, so rows can be gathered, split and concatenated as bytes.

use bytes::{Bytes, BytesMut};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::v1::Dtype;

/// The element type of a tensor on the wire. The protocol's `DTYPE_UNSPECIFIED` has no
/// counterpart: it is refused where a message is read ([`TryFrom`]), so no code past the boundary
/// falls back to a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireDtype {
    F32 = 1,
    F16 = 2,
    Bf16 = 3,
    /// e4m3 with one f32 scale per [`FP8_BLOCK`] values of a row; requests only.
    Fp8E4m3 = 4,
}

/// Values per FP8 scale (DeepEP's).
pub const FP8_BLOCK: usize = crate::fp8::BLOCK;

/// A dtype field that names no element type; the value is what was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("dtype {0} is unspecified or unknown (expected f32, f16, bf16 or fp8)")]
pub struct UnknownDtype(pub i32);

impl WireDtype {
    pub const ALL: [WireDtype; 4] = [WireDtype::F32, WireDtype::F16, WireDtype::Bf16, WireDtype::Fp8E4m3];

    /// Bytes per value, not counting FP8's block scales (see [`WireDtype::row_bytes`]).
    pub fn element_size(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::F16 | WireDtype::Bf16 => 2,
            WireDtype::Fp8E4m3 => 1,
        }
    }

    /// Bytes of one row of `width` values, FP8's scales included.
    pub fn row_bytes(self, width: usize) -> usize {
        match self {
            WireDtype::Fp8E4m3 => crate::fp8::row_bytes(width),
            dtype => width * dtype.element_size(),
        }
    }

    /// [`WireDtype::row_bytes`] of a width read off the wire: `None` where the count overflows.
    pub fn checked_row_bytes(self, width: usize) -> Option<usize> {
        match self {
            WireDtype::Fp8E4m3 => crate::fp8::checked_row_bytes(width),
            dtype => width.checked_mul(dtype.element_size()),
        }
    }

    /// Whether answers may be in this dtype: FP8 is a dispatch format only.
    pub fn answers(self) -> bool {
        self != WireDtype::Fp8E4m3
    }

    /// The dtype answers to rows of this dtype come back in: bf16 for FP8 (DeepEP's combine), the
    /// same dtype otherwise.
    pub fn answer_dtype(self) -> WireDtype {
        if self.answers() { self } else { WireDtype::Bf16 }
    }

    /// The name used in flags, error messages and reports.
    pub fn name(self) -> &'static str {
        match self {
            WireDtype::F32 => "f32",
            WireDtype::F16 => "f16",
            WireDtype::Bf16 => "bf16",
            WireDtype::Fp8E4m3 => "fp8",
        }
    }

    pub fn to_proto(self) -> Dtype {
        match self {
            WireDtype::F32 => Dtype::F32,
            WireDtype::F16 => Dtype::F16,
            WireDtype::Bf16 => Dtype::Bf16,
            WireDtype::Fp8E4m3 => Dtype::Fp8E4m3,
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
            .ok_or_else(|| format!("unknown dtype '{name}' (expected f32, f16, bf16 or fp8)"))
    }
}

impl TryFrom<i32> for WireDtype {
    type Error = UnknownDtype;

    fn try_from(value: i32) -> Result<Self, Self::Error> {
        match Dtype::try_from(value) {
            Ok(Dtype::F32) => Ok(WireDtype::F32),
            Ok(Dtype::F16) => Ok(WireDtype::F16),
            Ok(Dtype::Bf16) => Ok(WireDtype::Bf16),
            Ok(Dtype::Fp8E4m3) => Ok(WireDtype::Fp8E4m3),
            _ => Err(UnknownDtype(value)),
        }
    }
}

/// The little-endian 4-byte words of `bytes` (a token-major request's offsets, experts and
/// weights); a ragged tail is not a word.
pub fn le_words(bytes: &[u8]) -> impl Iterator<Item = [u8; 4]> + '_ {
    bytes.chunks_exact(4).map(|word| [word[0], word[1], word[2], word[3]])
}

/// Appends one row, `values`, to `out` encoded as `dtype`.
///
/// The bytes are written into a slice grown once, not appended value by value: the per-value
/// capacity checks of `BufMut::put_*` kept the loop from vectorising and made bf16 encoding the
/// largest client cost of a 7168-wide dispatch.
pub fn encode_row_into(values: &[f32], dtype: WireDtype, out: &mut BytesMut) {
    let start = out.len();
    out.resize(start + dtype.row_bytes(values.len()), 0);
    encode_row_to(values, dtype, &mut out[start..]);
}

/// Writes one row, `values`, encoded as `dtype` over `target` (`dtype.row_bytes(values.len())`
/// bytes).
pub fn encode_row_to(values: &[f32], dtype: WireDtype, target: &mut [u8]) {
    debug_assert_eq!(target.len(), dtype.row_bytes(values.len()));
    match dtype {
        WireDtype::F32 => {
            for (chunk, value) in target.chunks_exact_mut(4).zip(values) {
                chunk.copy_from_slice(&value.to_le_bytes());
            }
        }
        WireDtype::F16 => match halves_mut::<f16>(target) {
            Some(halves) => halves.convert_from_f32_slice(values),
            None => {
                for (chunk, value) in target.chunks_exact_mut(2).zip(values) {
                    chunk.copy_from_slice(&f16::from_f32(*value).to_bits().to_le_bytes());
                }
            }
        },
        WireDtype::Bf16 => match halves_mut::<u16>(target) {
            Some(halves) => encode_bf16(values, halves),
            None => {
                for (chunk, value) in target.chunks_exact_mut(2).zip(values) {
                    chunk.copy_from_slice(&bf16_bits(*value).to_le_bytes());
                }
            }
        },
        WireDtype::Fp8E4m3 => crate::fp8::encode_row(values, target),
    }
}

crate::simd::widest! {
    /// `values` as bf16 bits into `halves`. half's slice conversion is a loop of branches for bf16
    /// (F16C only speeds up f16): this one vectorises, and made bf16 encoding 2-3x faster.
    fn encode_bf16(values: &[f32], halves: &mut [u16]) => encode_bf16_portable
}

#[inline(always)]
fn encode_bf16_portable(values: &[f32], halves: &mut [u16]) {
    for (half, value) in halves.iter_mut().zip(values) {
        *half = bf16_bits(*value);
    }
}

crate::simd::widest! {
    /// Little-endian bf16 `bytes`, at any alignment, as f32 (each value's bits shifted into the
    /// high half, as half's `bf16::to_f32` does): 4.7x half's slice conversion, which does not
    /// vectorise for bf16.
    fn decode_bf16(bytes: &[u8], out: &mut [f32]) => decode_bf16_portable
}

#[inline(always)]
fn decode_bf16_portable(bytes: &[u8], out: &mut [f32]) {
    for (value, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *value = f32::from_bits(u32::from(u16::from_le_bytes([pair[0], pair[1]])) << 16);
    }
}

/// half's `bf16::from_f32` without branches: rounded to nearest even; NaN kept, made quiet.
#[inline(always)]
fn bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    (if bits & 0x7FFF_FFFF > 0x7F80_0000 { quiet_nan } else { rounded }) as u16
}

/// `bytes` as 16-bit floats in place, for half's slice conversions (F16C-vectorised for f16 where
/// the CPU has it): the wire is little-endian, as are the machines this runs on. `None` when the
/// bytes are not 2-aligned (a row after an odd-sized one), where the per-value loop runs instead.
#[cfg(target_endian = "little")]
fn halves<T: bytemuck::Pod>(bytes: &[u8]) -> Option<&[T]> {
    bytemuck::try_cast_slice(bytes).ok()
}

#[cfg(target_endian = "little")]
fn halves_mut<T: bytemuck::Pod>(bytes: &mut [u8]) -> Option<&mut [T]> {
    bytemuck::try_cast_slice_mut(bytes).ok()
}

/// Encodes `values`, rows of `width`, as `dtype` into a fresh buffer.
pub fn encode_rows(values: &[f32], width: usize, dtype: WireDtype) -> Bytes {
    let rows = values.len() / width.max(1);
    let mut out = BytesMut::with_capacity(rows * dtype.row_bytes(width));
    for row in values.chunks_exact(width.max(1)) {
        encode_row_into(row, dtype, &mut out);
    }
    out.freeze()
}

/// Encodes `values` as one row.
pub fn encode_f32(values: &[f32], dtype: WireDtype) -> Bytes {
    encode_rows(values, values.len(), dtype)
}

/// Decodes `bytes`, rows of `width` values in `dtype`, into `out`, which must hold exactly the
/// values they encode.
pub fn decode_rows_into(bytes: &[u8], width: usize, dtype: WireDtype, out: &mut [f32]) {
    debug_assert_eq!(bytes.len() / dtype.row_bytes(width).max(1), out.len() / width.max(1));
    match dtype {
        WireDtype::F32 => {
            for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
        WireDtype::F16 => match halves::<f16>(bytes) {
            Some(halves) => halves.convert_to_f32_slice(out),
            None => {
                // At an odd address: through an aligned block, so that the conversion still gets
                // F16C (one value at a time is ~7x slower).
                let mut aligned = [f16::ZERO; 256];
                for (pairs, values) in bytes.chunks(2 * aligned.len()).zip(out.chunks_mut(aligned.len())) {
                    let block = &mut aligned[..values.len()];
                    bytemuck::cast_slice_mut::<f16, u8>(block).copy_from_slice(pairs);
                    block.convert_to_f32_slice(values);
                }
            }
        },
        WireDtype::Bf16 => decode_bf16(bytes, out),
        WireDtype::Fp8E4m3 => {
            for (row, out_row) in bytes.chunks_exact(dtype.row_bytes(width)).zip(out.chunks_exact_mut(width)) {
                crate::fp8::decode_row(row, out_row);
            }
        }
    }
}

/// Decodes rows of `width` into a fresh f32 vector.
pub fn decode_rows(bytes: &[u8], width: usize, dtype: WireDtype) -> Vec<f32> {
    let rows = bytes.len() / dtype.row_bytes(width).max(1);
    let mut out = vec![0.0; rows * width];
    decode_rows_into(bytes, width, dtype, &mut out);
    out
}

/// Decodes a tensor of an answer dtype (f32, f16, bf16: no row structure) into a fresh vector.
pub fn decode_f32(bytes: &[u8], dtype: WireDtype) -> Vec<f32> {
    debug_assert!(dtype.answers(), "FP8 rows need their width: decode_rows");
    let values = bytes.len() / dtype.element_size();
    decode_rows(bytes, values.max(1), dtype)
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    /// 2-aligned bytes are converted where they lie, by half's vectorised slice conversions; only
    /// bytes at an odd address take the slower path (the same values, so no round trip shows it).
    #[test]
    #[cfg(target_endian = "little")]
    fn aligned_bytes_are_viewed_as_halves_in_place_and_odd_ones_are_not() {
        let mut words = [0u16; 6];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        let start = bytes.as_ptr() as usize;
        let viewed = halves::<f16>(&bytes[2..10]).map(|halves| (halves.as_ptr() as usize - start, halves.len()));
        assert_eq!(viewed, Some((2, 4)), "the same bytes, as 4 halves");
        assert!(halves::<f16>(&bytes[1..9]).is_none(), "an odd address");
        assert_eq!(halves_mut::<u16>(&mut bytes[4..12]).map(|halves| halves.len()), Some(4));
        assert!(halves_mut::<u16>(&mut bytes[3..11]).is_none(), "an odd address");
    }

    #[test]
    fn le_words_are_whole_four_byte_words_in_order() {
        let bytes = [1, 0, 0, 0, 0xFF, 2, 0, 0x80, 9, 9];
        let words: Vec<[u8; 4]> = le_words(&bytes).collect();
        assert_eq!(words, [[1, 0, 0, 0], [0xFF, 2, 0, 0x80]], "the ragged tail is no word");
        assert_eq!(words.iter().map(|word| u32::from_le_bytes(*word)).collect::<Vec<_>>(), [1, 0x8000_02FF]);
    }

    #[test]
    fn every_dtype_keeps_its_name_and_its_proto_value() {
        for dtype in WireDtype::ALL {
            assert_eq!(WireDtype::try_from(dtype.to_proto() as i32), Ok(dtype));
            assert_eq!(dtype.to_string(), dtype.name());
            assert_eq!(dtype.name().parse::<WireDtype>(), Ok(dtype));
        }
        assert_eq!(WireDtype::try_from(0), Err(UnknownDtype(0)), "unspecified is no dtype");
    }

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
            "dtype 9 is unspecified or unknown (expected f32, f16, bf16 or fp8)"
        );
        assert_eq!("bf16".parse::<WireDtype>(), Ok(WireDtype::Bf16));
        assert!(WireDtype::ALL.iter().all(|dtype| dtype.name().parse::<WireDtype>() == Ok(*dtype)));
    }

    /// A width read off the wire may be anything: its row's bytes are counted without wrapping.
    #[test]
    fn a_row_too_wide_to_count_has_no_byte_count() {
        assert_eq!(WireDtype::Fp8E4m3.checked_row_bytes(200), Some(WireDtype::Fp8E4m3.row_bytes(200)));
        assert_eq!(WireDtype::Bf16.checked_row_bytes(200), Some(400));
        assert_eq!(WireDtype::F32.checked_row_bytes(1 << 62), None, "4 << 62 wraps to 0");
        assert_eq!(WireDtype::F16.checked_row_bytes(usize::MAX / 2 + 1), None);
        assert_eq!(WireDtype::Fp8E4m3.checked_row_bytes(usize::MAX), None);
    }

    /// DeepEP's format: one byte per value plus one f32 scale per 128 values of a row; each block's
    /// largest magnitude is exact, the others within e4m3's 3 mantissa bits (a relative step of
    /// 1/16 of the block's scale at most); rows are self-contained, so a width of 200 (two blocks,
    /// one partial) gathers and splits as bytes.
    #[test]
    fn fp8_rows_carry_a_scale_per_block_and_round_trip_within_e4m3_precision() {
        let width = 200;
        let values: Vec<f32> =
            (0..3 * width).map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i / width) as f32 * 100.0)).collect();
        let bytes = encode_rows(&values, width, WireDtype::Fp8E4m3);
        assert_eq!(WireDtype::Fp8E4m3.row_bytes(width), 200 + 2 * 4);
        assert_eq!(bytes.len(), 3 * 208);
        let decoded = decode_rows(&bytes, width, WireDtype::Fp8E4m3);
        for (row, (original, back)) in values.chunks(width).zip(decoded.chunks(width)).enumerate() {
            for (block, (original, back)) in original.chunks(FP8_BLOCK).zip(back.chunks(FP8_BLOCK)).enumerate() {
                let largest = original.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (o, b) in original.iter().zip(back) {
                    assert!((o - b).abs() <= largest / 16.0 + 1e-6, "row {row} block {block}: {o} -> {b}");
                }
                let at = original.iter().position(|v| v.abs() == largest).expect("a largest value");
                assert!((original[at] - back[at]).abs() <= largest * 1e-6, "the block's largest value is exact");
            }
        }
        let second_row = decode_rows(&bytes[208..416], width, WireDtype::Fp8E4m3);
        assert_eq!(second_row, decoded[width..2 * width], "a row decodes on its own");
        assert_eq!(WireDtype::Fp8E4m3.answer_dtype(), WireDtype::Bf16);
        assert!(!WireDtype::Fp8E4m3.answers() && WireDtype::F16.answers());
    }

    /// The codes are torch's `float8_e4m3fn`: checked against values torch encodes them to.
    #[test]
    fn fp8_codes_are_torchs_e4m3fn() {
        let row = [448.0f32, 1.0, -2.5, 0.3, 0.001953125];
        let bytes = encode_rows(&row, row.len(), WireDtype::Fp8E4m3);
        // torch.tensor([448, 1, -2.5, 0.3, 2**-9]).to(torch.float8_e4m3fn).view(torch.uint8)
        assert_eq!(&bytes[..5], &[126, 56, 194, 42, 1]);
        assert_eq!(&bytes[5..9], &1.0f32.to_le_bytes(), "the scale: the largest value is already 448");
    }

    /// half's slice conversions (aligned rows) and the per-value loop (a row after an odd-sized
    /// one) write the same bits, NaN, infinities, subnormals and rounding ties included.
    #[test]
    fn aligned_and_unaligned_rows_encode_and_decode_alike() {
        let mut values: Vec<f32> = (0..4099).map(|i| (i as f32 - 2000.0) * 0.37e-3).collect();
        values.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -1e-40,
            65504.0,
            65520.0,
            1e9,
            -0.0,
            f32::from_bits(0x3f80_8000), // a bf16 rounding tie
            1.0 + f32::EPSILON,
        ]);
        for dtype in [WireDtype::F16, WireDtype::Bf16] {
            let mut aligned = BytesMut::new();
            encode_row_into(&values, dtype, &mut aligned);
            let mut unaligned = BytesMut::from(&[0xAAu8][..]);
            encode_row_into(&values, dtype, &mut unaligned);
            let per_value: Vec<u8> = values
                .iter()
                .flat_map(|value| match dtype {
                    WireDtype::F16 => f16::from_f32(*value).to_bits().to_le_bytes(),
                    _ => bf16::from_f32(*value).to_bits().to_le_bytes(),
                })
                .collect();
            assert_eq!(&aligned[..], &per_value[..], "{dtype:?} aligned");
            assert_eq!(&unaligned[1..], &per_value[..], "{dtype:?} unaligned");

            let mut from_aligned = vec![0.0f32; values.len()];
            decode_rows_into(&aligned, values.len(), dtype, &mut from_aligned);
            let mut from_unaligned = vec![0.0f32; values.len()];
            decode_rows_into(&unaligned[1..], values.len(), dtype, &mut from_unaligned);
            let bits = |decoded: &[f32]| decoded.iter().map(|value| value.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&from_aligned), bits(&from_unaligned), "{dtype:?} decode");
            let one_by_one: Vec<f32> = per_value
                .chunks_exact(2)
                .map(|pair| match u16::from_le_bytes([pair[0], pair[1]]) {
                    half_bits if dtype == WireDtype::F16 => f16::from_bits(half_bits).to_f32(),
                    half_bits => bf16::from_bits(half_bits).to_f32(),
                })
                .collect();
            assert_eq!(bits(&from_aligned), bits(&one_by_one), "{dtype:?} decodes as half does");
        }
    }

    #[test]
    fn bf16_bits_are_halfs_over_a_stride_of_every_bit_pattern() {
        for bits in (0..=u32::MAX).step_by(997).chain([0x7F80_0000, 0xFF80_0000, 0x7F7F_FFFF, 0x3F80_8000, 0x3F81_8000])
        {
            let value = f32::from_bits(bits);
            assert_eq!(bf16_bits(value), bf16::from_f32(value).to_bits(), "{value:e} ({bits:#010x})");
        }
    }

    #[test]
    fn bytes_are_little_endian() {
        assert_eq!(&encode_f32(&[1.0], WireDtype::F32)[..], &1.0f32.to_le_bytes());
        assert_eq!(&encode_f32(&[1.0], WireDtype::Bf16)[..], &[0x80, 0x3f]);
    }
}
