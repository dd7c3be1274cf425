//! e4m3fn codes (torch's `float8_e4m3fn`) of whole blocks at once.
//!
//! `float8::F8E4M3` converts one value at a time through branches, about 5 ns a value: 4.3 ms for
//! one DeepEP low-latency dispatch (128 x 7168), eight times the bf16 encode. The conversion below
//! is c10's `fp8e4m3fn_from_fp32_value` written without branches, so the compiler vectorises a
//! block's loop; decoding reads a table of the 256 codes. Codes are c10's bit for bit (tested over
//! every f32 exponent and the rounding boundaries): the crate's, except past 464, where the crate
//! saturates to 448 and c10 (and this) gives NaN.

use std::sync::LazyLock;

use float8::F8E4M3;

/// Magnitudes from 480 (the first past 448 that rounds away from it) up, NaN included, have no
/// finite code: e4m3fn has no infinity, so they become NaN, as in c10.
const NAN_FROM_BITS: u32 = 0x43F0_0000;
/// 2⁻⁶, e4m3's smallest normal value.
const NORMAL_FROM_BITS: u32 = 121 << 23;
/// 2¹⁴: its ulp is 2⁻⁹, e4m3's subnormal step, so adding it rounds a subnormal magnitude to a
/// whole number of steps (to nearest, ties to even: the FPU's rounding).
const SUBNORMAL_MAGIC: f32 = 16384.0;
/// f32's exponent bias less e4m3's (127 - 7), in place for a code's exponent field.
const REBIAS: u32 = 120 << 3;
const NAN_CODE: u32 = 0x7F;

/// The e4m3fn code of `value`, rounded to nearest even; values past 464 and NaN become NaN.
#[inline(always)]
pub fn code(value: f32) -> u8 {
    let bits = value.to_bits();
    let sign = (bits >> 24) & 0x80;
    let magnitude = bits & 0x7FFF_FFFF;
    // Keep the top 3 mantissa bits, rounded to nearest even; a carry moves into the exponent.
    let rounded = magnitude.wrapping_add(0x7_FFFF + ((magnitude >> 20) & 1));
    let normal = (rounded >> 20).wrapping_sub(REBIAS);
    let subnormal = (f32::from_bits(magnitude) + SUBNORMAL_MAGIC).to_bits().wrapping_sub(SUBNORMAL_MAGIC.to_bits());
    let code = if magnitude >= NAN_FROM_BITS {
        NAN_CODE
    } else if magnitude < NORMAL_FROM_BITS {
        subnormal
    } else {
        normal
    };
    (sign | code) as u8
}

/// The largest magnitude at which a block is coded: 448, e4m3fn's largest finite value.
pub const MAX: f32 = 448.0;

/// Values per scale (DeepEP's).
pub const BLOCK: usize = 128;

/// Bytes of one row of `width` values: the codes, then one f32 scale per block.
pub const fn row_bytes(width: usize) -> usize {
    match checked_row_bytes(width) {
        Some(bytes) => bytes,
        None => panic!("an FP8 row's bytes overflow usize"),
    }
}

/// [`row_bytes`] of a width read off the wire: `None` where the count overflows.
pub const fn checked_row_bytes(width: usize) -> Option<usize> {
    width.checked_add(4 * width.div_ceil(BLOCK))
}

crate::simd::widest! {
/// Encodes one row into `target` ([`row_bytes`] long): each block's codes scaled so that its
/// largest finite magnitude is [`MAX`], then the blocks' scales.
pub fn encode_row(values: &[f32], target: &mut [u8]) => encode_row_portable }

#[inline(always)]
fn encode_row_portable(values: &[f32], target: &mut [u8]) {
    let (codes, scales) = target.split_at_mut(values.len());
    let blocks = values.chunks(BLOCK).zip(codes.chunks_mut(BLOCK));
    for ((block, block_codes), scale_bytes) in blocks.zip(scales.chunks_exact_mut(4)) {
        let scale = encode_block(block, block_codes);
        scale_bytes.copy_from_slice(&scale.to_le_bytes());
    }
}

/// Writes the codes of one block of `values` into `codes` (as long as `values`), scaled so that
/// the block's largest finite magnitude is [`MAX`], and returns the scale (1 for a block of zeros,
/// or with an infinity).
#[inline(always)]
fn encode_block(values: &[f32], codes: &mut [u8]) -> f32 {
    let largest = largest_magnitude(values);
    let scale = if largest > 0.0 && largest.is_finite() { largest / MAX } else { 1.0 };
    for (code_out, value) in codes.iter_mut().zip(values) {
        *code_out = code(value / scale);
    }
    scale
}

/// The largest magnitude in `values`, NaN aside (as `f32::max` folds it). Compared as bits, in
/// lanes: a magnitude's bits order as its value does (and fit an `i32`, which SSE2 compares), and
/// independent lanes vectorise where one float fold, bound to its order, does not.
#[inline(always)]
fn largest_magnitude(values: &[f32]) -> f32 {
    const INFINITY_BITS: i32 = 0x7F80_0000;
    const LANES: usize = 8;
    let finite_magnitude = |value: &f32| {
        let magnitude = (value.to_bits() & 0x7FFF_FFFF) as i32;
        if magnitude > INFINITY_BITS { 0 } else { magnitude }
    };
    let mut lanes = [0i32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder().iter().map(finite_magnitude).max().unwrap_or(0);
    for chunk in chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            *lane = (*lane).max(finite_magnitude(value));
        }
    }
    f32::from_bits(lanes.into_iter().fold(rest, i32::max) as u32)
}

static VALUES: LazyLock<[f32; 256]> =
    LazyLock::new(|| std::array::from_fn(|code| F8E4M3::from_bits(code as u8).to_f32()));

/// Decodes one row of `width` = `out.len()` values ([`row_bytes`] of `row`).
pub fn decode_row(row: &[u8], out: &mut [f32]) {
    let values = &*VALUES;
    let (codes, scales) = row.split_at(out.len());
    let blocks = codes.chunks(BLOCK).zip(out.chunks_mut(BLOCK));
    for ((block_codes, block), scale) in blocks.zip(scales.chunks_exact(4)) {
        let scale = f32::from_le_bytes([scale[0], scale[1], scale[2], scale[3]]);
        for (value, code) in block.iter_mut().zip(block_codes) {
            *value = values[usize::from(*code)] * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// c10's code: the crate's, but past 464 (where the crate saturates to ±448) NaN.
    fn torchs_code(value: f32) -> u8 {
        if value.is_nan() || value.abs() > 464.0 {
            ((value.to_bits() >> 24) & 0x80) as u8 | 0x7F
        } else {
            F8E4M3::from_f32(value).to_bits()
        }
    }

    /// Every f32 exponent, with mantissas around each e4m3 rounding point (the half-step bit and
    /// its neighbours), both signs, the specials, and a stride through every bit pattern.
    #[test]
    fn codes_are_torchs_for_every_exponent_and_rounding_boundary() {
        let mut checked = 0;
        for exponent in 0..=255u32 {
            for mantissa_top in 0..16u32 {
                for low in [0u32, 1, 0x3_FFFF, 0x4_0000, 0x4_0001, 0x7_FFFF, 0x8_0000, 0x8_0001, 0x5_5555] {
                    let mantissa = ((mantissa_top << 19) ^ low) & 0x7F_FFFF;
                    for sign in [0u32, 1 << 31] {
                        let value = f32::from_bits(sign | (exponent << 23) | mantissa);
                        assert_eq!(code(value), torchs_code(value), "{value:e} ({:#010x})", value.to_bits());
                        checked += 1;
                    }
                }
            }
        }
        for bits in (0..=u32::MAX).step_by(4099) {
            let value = f32::from_bits(bits);
            assert_eq!(code(value), torchs_code(value), "{value:e} ({bits:#010x})");
            checked += 1;
        }
        for value in [0.0, -0.0, 448.0, 464.0, 464.0001, 479.99, 480.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            assert_eq!(code(value), torchs_code(value), "{value}");
        }
        assert!(checked > 1_000_000);
    }

    /// Past 448, subnormal ties and infinities, against what torch 2.11 wrote:
    /// `torch.tensor([...]).to(torch.float8_e4m3fn).view(torch.uint8)`.
    #[test]
    fn out_of_range_and_subnormal_ties_are_torchs() {
        let values = [464.0, 464.0001, 470.0, 479.99, 480.0, 1e9, f32::INFINITY, f32::NEG_INFINITY];
        let ties = [2f32.powi(-10), 3.0 * 2f32.powi(-10), -5.0 * 2f32.powi(-10), 448.0];
        let codes: Vec<u8> = values.iter().chain(&ties).map(|value| code(*value)).collect();
        assert_eq!(codes, [126, 127, 127, 127, 127, 127, 127, 255, 0, 2, 130, 126]);
    }

    #[test]
    fn the_largest_magnitude_skips_nan_as_a_float_fold_does() {
        let values = [1.0, -7.5, f32::NAN, 3.0, -f32::NAN, 0.0];
        assert_eq!(largest_magnitude(&values), 7.5);
        assert_eq!(largest_magnitude(&[f32::NAN]), 0.0);
        assert_eq!(largest_magnitude(&[2.0, f32::NEG_INFINITY]), f32::INFINITY);
        let mut row = [0u8; row_bytes(3)];
        encode_row(&[0.0, -0.0, 0.0], &mut row);
        assert_eq!(row[3..], 1.0f32.to_le_bytes(), "zeros keep a scale of 1");
        encode_row(&[896.0, -1.0, f32::NAN], &mut row);
        assert_eq!(row, [code(448.0), code(-0.5), code(f32::NAN), 0, 0, 0, 0x40]);
    }

    /// The vectorised row (AVX2 here, where the CPU has it) and the portable one write the bits a
    /// value-by-value encode writes, over rows with partial blocks, zeros, NaN and infinities.
    #[test]
    fn rows_encode_as_value_by_value_on_every_path() {
        let width = 300usize;
        let mut values: Vec<f32> =
            (0..4 * width).map(|i| ((i as f32) * 0.731).sin() * 10f32.powi((i % 9) as i32 - 4)).collect();
        values[width..width + 128].fill(0.0);
        values[2 * width + 5] = f32::NAN;
        values[3 * width + 130] = f32::NEG_INFINITY;
        for row in values.chunks_exact(width) {
            let mut expected = vec![0u8; row_bytes(width)];
            let (codes, scales) = expected.split_at_mut(width);
            for ((block, block_codes), scale_bytes) in
                row.chunks(BLOCK).zip(codes.chunks_mut(BLOCK)).zip(scales.chunks_exact_mut(4))
            {
                let largest = block.iter().fold(0.0f32, |largest, value| largest.max(value.abs()));
                let scale = if largest > 0.0 && largest.is_finite() { largest / MAX } else { 1.0 };
                for (code_out, value) in block_codes.iter_mut().zip(block) {
                    *code_out = code(value / scale);
                }
                scale_bytes.copy_from_slice(&scale.to_le_bytes());
            }
            let mut dispatched = vec![0u8; row_bytes(width)];
            encode_row(row, &mut dispatched);
            let mut portable = vec![0u8; row_bytes(width)];
            encode_row_portable(row, &mut portable);
            assert_eq!(dispatched, expected);
            assert_eq!(portable, expected);
        }
    }

    /// A dense sweep of the range scaled blocks use.
    #[test]
    fn codes_match_over_a_dense_sweep_of_the_finite_range() {
        for step in 0..2_000_000u32 {
            let value = (step as f32 - 1_000_000.0) * 4.5e-4;
            assert_eq!(code(value), torchs_code(value), "{value:e}");
        }
    }

    #[test]
    fn the_table_decodes_every_code_as_the_crate_does() {
        let mut row: Vec<u8> = (0..=255).collect();
        row.extend(std::iter::repeat_n(2.0f32.to_le_bytes(), 2).flatten());
        let mut values = vec![0.0f32; 256];
        decode_row(&row, &mut values);
        for (code, value) in (0..=255u8).zip(&values) {
            let expected = F8E4M3::from_bits(code).to_f32() * 2.0;
            assert!(value.to_bits() == expected.to_bits() || (value.is_nan() && expected.is_nan()), "code {code}");
        }
    }
}
