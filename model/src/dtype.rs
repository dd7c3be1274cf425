//! The element types weights are stored in and computed with, and weights as typed bytes.
//!
//! A checkpoint's tensors are read as they are stored ([`HostTensor`]): a bf16 checkpoint reaches
//! the device as bf16, with no round trip through f32. Layout changes some families need (GPT-OSS's
//! transposed and interleaved experts, Granite's fused gate and up rows) move whole elements of any
//! size, so they never convert.

use half::{bf16, f16};
use switchyard_proto::v1;

/// The element type of weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
}

impl WeightDtype {
    pub const ALL: [WeightDtype; 3] = [WeightDtype::F32, WeightDtype::F16, WeightDtype::Bf16];

    pub fn element_size(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::F16 | WeightDtype::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
        }
    }

    pub fn to_proto(self) -> v1::Dtype {
        match self {
            WeightDtype::F32 => v1::Dtype::F32,
            WeightDtype::F16 => v1::Dtype::F16,
            WeightDtype::Bf16 => v1::Dtype::Bf16,
        }
    }

    /// A wire dtype field: `None` when unspecified (the receiver's default applies).
    pub fn from_proto(value: i32) -> Result<Option<Self>, String> {
        match v1::Dtype::try_from(value) {
            Ok(v1::Dtype::Unspecified) => Ok(None),
            Ok(v1::Dtype::F32) => Ok(Some(WeightDtype::F32)),
            Ok(v1::Dtype::F16) => Ok(Some(WeightDtype::F16)),
            Ok(v1::Dtype::Bf16) => Ok(Some(WeightDtype::Bf16)),
            Ok(v1::Dtype::Fp8E4m3) => Err("fp8 is a wire format only; weights are f32, f16 or bf16".to_owned()),
            Err(_) => Err(format!("unknown dtype {value}")),
        }
    }

    /// The dtype a safetensors header names (`F32`, `F16`, `BF16`).
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::F32 => Some(WeightDtype::F32),
            safetensors::Dtype::F16 => Some(WeightDtype::F16),
            safetensors::Dtype::BF16 => Some(WeightDtype::Bf16),
            _ => None,
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|dtype| dtype.name() == name)
            .ok_or_else(|| format!("unknown dtype '{name}' (expected f32, f16 or bf16)"))
    }
}

/// A row-major tensor in host memory, as little-endian bytes of its dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub dtype: WeightDtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl HostTensor {
    /// `values` as an f32 tensor of `shape`.
    pub fn from_f32(values: &[f32], shape: &[usize]) -> Self {
        debug_assert_eq!(values.len(), shape.iter().product::<usize>());
        Self {
            dtype: WeightDtype::F32,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|value| value.to_le_bytes()).collect(),
        }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.bytes.len() / self.dtype.element_size()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Every element as f32 (exact: f16 and bf16 widen without rounding).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            WeightDtype::F32 => {
                self.bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            WeightDtype::F16 => self.bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            WeightDtype::Bf16 => {
                self.bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
        }
    }

    /// This tensor in `dtype` (rounding to nearest when narrowing).
    pub fn to_dtype(&self, dtype: WeightDtype) -> Self {
        if dtype == self.dtype {
            return self.clone();
        }
        let values = self.to_f32();
        let bytes = match dtype {
            WeightDtype::F32 => values.iter().flat_map(|value| value.to_le_bytes()).collect(),
            WeightDtype::F16 => values.iter().flat_map(|value| f16::from_f32(*value).to_le_bytes()).collect(),
            WeightDtype::Bf16 => values.iter().flat_map(|value| bf16::from_f32(*value).to_le_bytes()).collect(),
        };
        Self { dtype, shape: self.shape.clone(), bytes }
    }

    /// The `[cols, rows]` transpose of a `[rows, cols]` matrix.
    pub fn transposed(&self) -> Self {
        let [rows, cols] = self.matrix_shape();
        let size = self.dtype.element_size();
        let mut bytes = Vec::with_capacity(self.bytes.len());
        for col in 0..cols {
            for row in 0..rows {
                let start = (row * cols + col) * size;
                bytes.extend_from_slice(&self.bytes[start..start + size]);
            }
        }
        Self { dtype: self.dtype, shape: vec![cols, rows], bytes }
    }

    /// Rows `first, first + step, ...` of a `[rows, cols]` matrix, or elements of a vector.
    pub fn every_nth_row(&self, first: usize, step: usize) -> Self {
        let [rows, cols] = self.matrix_shape();
        let row_bytes = cols * self.dtype.element_size();
        let kept: Vec<usize> = (first..rows).step_by(step).collect();
        let mut bytes = Vec::with_capacity(kept.len() * row_bytes);
        for row in &kept {
            bytes.extend_from_slice(&self.bytes[row * row_bytes..(row + 1) * row_bytes]);
        }
        let shape = if self.shape.len() == 1 { vec![kept.len()] } else { vec![kept.len(), cols] };
        Self { dtype: self.dtype, shape, bytes }
    }

    /// Splits a `[rows, cols]` matrix after its first `rows` rows.
    pub fn split_rows(mut self, rows: usize) -> (Self, Self) {
        let [_, cols] = self.matrix_shape();
        let tail = self.bytes.split_off(rows * cols * self.dtype.element_size());
        let tail_rows = tail.len() / (cols * self.dtype.element_size()).max(1);
        let tail = Self { dtype: self.dtype, shape: vec![tail_rows, cols], bytes: tail };
        self.shape = vec![rows, cols];
        (self, tail)
    }

    /// `[rows, cols]`, a vector being one column.
    fn matrix_shape(&self) -> [usize; 2] {
        match self.shape[..] {
            [rows, cols] => [rows, cols],
            [length] => [length, 1],
            _ => [self.len(), 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix() -> HostTensor {
        HostTensor::from_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])
    }

    #[test]
    fn layout_changes_move_elements_without_converting() {
        let bf16_matrix = matrix().to_dtype(WeightDtype::Bf16);
        let transposed = bf16_matrix.transposed();
        assert_eq!((transposed.dtype, transposed.shape.clone()), (WeightDtype::Bf16, vec![3, 2]));
        assert_eq!(transposed.to_f32(), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let odd = transposed.every_nth_row(1, 2);
        assert_eq!((odd.shape.clone(), odd.to_f32()), (vec![1, 2], vec![2.0, 5.0]));
        let (head, tail) = matrix().split_rows(1);
        assert_eq!((head.to_f32(), tail.to_f32()), (vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]));
        assert_eq!((head.shape, tail.shape), (vec![1, 3], vec![1, 3]));
        let (head, tail) = bf16_matrix.transposed().split_rows(1);
        assert_eq!((head.shape, tail.shape.clone()), (vec![1, 2], vec![2, 2]), "rows counted in bf16 bytes");
        assert_eq!(tail.to_f32(), [2.0, 5.0, 3.0, 6.0]);
        let (_, three_rows) = HostTensor::from_f32(&[0.5; 12], &[4, 3]).split_rows(1);
        assert_eq!(three_rows.shape, [3, 3]);
        let (whole, nothing) = matrix().split_rows(2);
        assert_eq!((whole.len(), nothing.shape.clone(), nothing.is_empty()), (6, vec![0, 3], true));
        assert!(!whole.is_empty());
        let vector = HostTensor::from_f32(&[1.0, 2.0, 3.0, 4.0], &[4]);
        assert_eq!(vector.every_nth_row(0, 2).to_f32(), [1.0, 3.0]);
    }

    #[test]
    fn names_and_widening() {
        let stored = [
            (WeightDtype::F32, safetensors::Dtype::F32),
            (WeightDtype::F16, safetensors::Dtype::F16),
            (WeightDtype::Bf16, safetensors::Dtype::BF16),
        ];
        for (dtype, stored) in stored {
            assert_eq!(WeightDtype::from_safetensors(stored), Some(dtype));
            assert_eq!(dtype.to_string().parse::<WeightDtype>(), Ok(dtype), "{dtype} names itself");
        }
        assert_eq!(WeightDtype::from_safetensors(safetensors::Dtype::I64), None, "no weights of integers");
        assert_eq!("f16".parse::<WeightDtype>(), Ok(WeightDtype::F16));
        let narrowed = HostTensor::from_f32(&[1.0 / 3.0], &[1]).to_dtype(WeightDtype::Bf16);
        assert_eq!(narrowed.bytes.len(), 2);
        assert!((narrowed.to_f32()[0] - 1.0 / 3.0).abs() < 1e-2);
    }
}
