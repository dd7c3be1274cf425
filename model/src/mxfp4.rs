//! MXFP4, the OCP microscaling format GPT-OSS ships its experts in: blocks of 32 FP4 (E2M1) values
//! sharing one power-of-two scale (E8M0, bias 127). A row of `cols` values is `cols / 32` blocks of
//! 16 bytes, two values per byte, the low nibble first; as transformers' `convert_moe_packed_tensors`
//! reads it. Every dequantized value is exact in f32 (and bf16): a 2-bit mantissa times a power of two.

/// The E2M1 value of each 4-bit code: sign bit, then magnitude.
const FP4_VALUES: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// Values per block; each block has one scale.
pub const BLOCK: usize = 32;

/// Dequantizes `rows` rows of `blocks` (`[rows, cols / 32, 16]` bytes) with their `scales`
/// (`[rows, cols / 32]` exponents biased by 127) into a row-major `[rows, cols]` matrix.
pub fn dequantize(blocks: &[u8], scales: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    debug_assert_eq!(blocks.len(), rows * cols / 2);
    debug_assert_eq!(scales.len(), rows * cols / BLOCK);
    let mut values = Vec::with_capacity(rows * cols);
    for (block, scale) in blocks.chunks_exact(BLOCK / 2).zip(scales) {
        let factor = 2f32.powi(i32::from(*scale) - 127);
        for byte in block {
            values.push(FP4_VALUES[usize::from(byte & 0x0f)] * factor);
            values.push(FP4_VALUES[usize::from(byte >> 4)] * factor);
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibbles_low_first_scaled_by_the_blocks_exponent() {
        // One row of 32 values: byte 0 holds codes 0x1 (0.5, low) and 0xF (-6, high), the rest 0x72
        // (low 2 = 1.0, high 7 = 6.0); the scale 129 means x 4.
        let mut block = vec![0x72u8; 16];
        block[0] = 0xF1;
        let values = dequantize(&block, &[129], 1, 32);
        assert_eq!(&values[..4], [2.0, -24.0, 4.0, 24.0]);
        assert_eq!(values.len(), 32);
        // Scale 127 is x 1; 126 is x 0.5; two rows keep their own scales.
        let two_rows = dequantize(&[[0x43u8; 16], [0x43u8; 16]].concat(), &[127, 126], 2, 32);
        assert_eq!((two_rows[0], two_rows[1], two_rows[32], two_rows[33]), (1.5, 2.0, 0.75, 1.0));
    }

    /// Every code against E2M1 worked out from its bits: sign, 2-bit exponent (bias 1), 1-bit
    /// mantissa, subnormal at exponent 0.
    #[test]
    fn every_code_is_its_e2m1_value() {
        let e2m1 = |code: u8| {
            let (sign, exponent, mantissa) = (code >> 3, i32::from((code >> 1) & 3), f32::from(code & 1));
            let magnitude =
                if exponent == 0 { mantissa * 0.5 } else { (1.0 + mantissa / 2.0) * 2f32.powi(exponent - 1) };
            if sign == 1 { -magnitude } else { magnitude }
        };
        let mut block = [0u8; 16];
        for (pair, byte) in block.iter_mut().take(8).enumerate() {
            *byte = (2 * pair as u8) | ((2 * pair as u8 + 1) << 4);
        }
        let values = dequantize(&block, &[127], 1, 32);
        let expected: Vec<f32> = (0..16).map(e2m1).collect();
        assert_eq!(values[..16], expected[..]);
    }
}
