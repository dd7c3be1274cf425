//! The router's linear layer: `logits = x · W_gᵀ`, `[tokens, experts]`.
//!
//! Plain Rust, not libtorch: it is `experts` dot products per token, small next to the experts, and
//! keeping it here makes the client's routing path free of tch and `Sync`.

use switchyard_model::ModelSpec;
use switchyard_model::synthetic;

#[derive(Debug, Clone)]
pub struct Gate {
    experts: usize,
    d_model: usize,
    /// `[experts, d_model]`, row-major.
    weights: Vec<f32>,
}

impl Gate {
    /// The seeded gate of `layer` of a synthetic model.
    pub fn synthetic(spec: &ModelSpec, layer: u32) -> Self {
        let weights = synthetic::gate_weights(spec.seed, layer, spec.experts_per_layer, spec.d_model);
        Self::from_weights(weights, spec.experts_per_layer as usize, spec.d_model as usize)
    }

    pub fn from_weights(weights: Vec<f32>, experts: usize, d_model: usize) -> Self {
        assert_eq!(weights.len(), experts * d_model, "gate weights must be [experts, d_model]");
        Self { experts, d_model, weights }
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Writes the logits of every row of `hidden` (`[tokens, d_model]`) into `logits`.
    pub fn logits_into(&self, hidden: &[f32], logits: &mut Vec<f32>) {
        let tokens = hidden.len() / self.d_model;
        logits.clear();
        logits.reserve(tokens * self.experts);
        for row in hidden.chunks_exact(self.d_model) {
            logits.extend(self.weights.chunks_exact(self.d_model).map(|expert_row| dot(row, expert_row)));
        }
    }

    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        let mut logits = Vec::new();
        self.logits_into(hidden, &mut logits);
        logits
    }
}

/// Dot product with eight independent accumulators, so the compiler vectorises it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logits_are_row_dot_products() {
        let gate = Gate::from_weights(vec![1.0, 0.0, 0.0, 2.0, -1.0, 1.0], 3, 2);
        assert_eq!(gate.logits(&[3.0, 4.0, 0.5, -1.0]), [3.0, 8.0, 1.0, 0.5, -2.0, -1.5]);
    }

    #[test]
    fn dot_handles_tails_and_matches_the_naive_sum() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.1).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-4);
    }
}
