//! The router's linear layer: `logits = x · W_gᵀ (+ b)`, `[tokens, experts]`.
//!
//! Plain Rust, not libtorch: it is `experts` dot products per token, small next to the experts, and
//! keeping it here makes the client's routing path free of tch and `Sync`.

use std::sync::OnceLock;

use switchyard_model::ModelSpec;
use switchyard_model::checkpoint::{Checkpoint, CheckpointError};
use switchyard_model::synthetic;

#[derive(Debug, Clone)]
pub struct Gate {
    experts: usize,
    d_model: usize,
    /// `[experts, d_model]`, row-major.
    weights: Vec<f32>,
    /// `W_noise [experts, d_model]` of noisy top-k gating.
    noise_weights: Option<Vec<f32>>,
    /// The router's learned logit bias `[experts]` (GPT-OSS; Switch Transformers with `router_bias`).
    logit_bias: Option<Vec<f32>>,
    /// The score-correction bias `[experts]` of group-limited routing (DeepSeek-V3).
    correction_bias: Option<Vec<f32>>,
    /// The synthetic model this gate came from, so Soft MoE slot parameters can be built on demand.
    synthetic: Option<(ModelSpec, u32)>,
    /// Soft MoE's `Φ [experts * slots, d_model]`, built for the first slot count asked.
    soft_slots: OnceLock<(usize, Vec<f32>)>,
    /// Shared experts' sigmoid gates `[shared_experts, d_model]`, when the model gates them.
    shared_gate: Option<Vec<f32>>,
}

impl Gate {
    /// The seeded gate of `layer` of a synthetic model, with seeded noise weights and bias.
    pub fn synthetic(spec: &ModelSpec, layer: u32) -> Self {
        let (experts, d_model) = (spec.experts_per_layer, spec.d_model);
        let weights = synthetic::gate_weights(spec.seed, layer, experts, d_model);
        let mut gate = Self::from_weights(weights, experts as usize, d_model as usize);
        gate.noise_weights = Some(synthetic::gate_noise_weights(spec.seed, layer, experts, d_model));
        gate.correction_bias = Some(synthetic::gate_bias(spec.seed, layer, experts));
        gate.synthetic = Some((spec.clone(), layer));
        if spec.shared_experts > 0 && spec.shared_expert_gate {
            gate.shared_gate = Some(synthetic::shared_gate_weights(spec.seed, layer, spec.shared_experts, d_model));
        }
        gate
    }

    pub fn from_weights(weights: Vec<f32>, experts: usize, d_model: usize) -> Self {
        assert_eq!(weights.len(), experts * d_model, "gate weights must be [experts, d_model]");
        Self {
            experts,
            d_model,
            weights,
            noise_weights: None,
            logit_bias: None,
            correction_bias: None,
            synthetic: None,
            soft_slots: OnceLock::new(),
            shared_gate: None,
        }
    }

    /// The router of `layer` of a checkpoint, with its biases and its shared-expert gate if it has them.
    pub fn from_checkpoint(checkpoint: &Checkpoint, layer: u32) -> Result<Self, CheckpointError> {
        let spec = &checkpoint.spec;
        let mut gate =
            Self::from_weights(checkpoint.gate_weights(layer)?, spec.experts_per_layer as usize, spec.d_model as usize);
        gate.logit_bias = checkpoint.gate_bias(layer)?;
        gate.correction_bias = checkpoint.correction_bias(layer)?;
        gate.shared_gate = checkpoint.shared_gate_weights(layer)?;
        Ok(gate)
    }

    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Soft MoE's slot logits `x · Φᵀ`, `[tokens, experts * slots]`. A synthetic gate has seeded slot
    /// parameters; any other gate uses its router row of expert e for each slot of expert e.
    pub fn slot_logits(&self, hidden: &[f32], slots: usize) -> Vec<f32> {
        let build = || match &self.synthetic {
            Some((spec, layer)) => {
                synthetic::soft_slot_weights(spec.seed, *layer, spec.experts_per_layer, slots as u32, spec.d_model)
            }
            None => self.weights.chunks_exact(self.d_model).flat_map(|row| row.repeat(slots)).collect(),
        };
        let cached = self.soft_slots.get_or_init(|| (slots, build()));
        let rebuilt;
        let weights = if cached.0 == slots {
            &cached.1
        } else {
            rebuilt = build();
            &rebuilt
        };
        let mut logits = Vec::new();
        project_into(weights, self.d_model, hidden, &mut logits);
        logits
    }

    /// `x · W_noiseᵀ`, when this gate has noise weights.
    pub fn noise_logits(&self, hidden: &[f32]) -> Option<Vec<f32>> {
        let mut logits = Vec::new();
        project_into(self.noise_weights.as_ref()?, self.d_model, hidden, &mut logits);
        Some(logits)
    }

    /// Each token's weight for each of `shared_experts` shared experts, `[tokens, shared_experts]`:
    /// `sigmoid(x · w_gate)` when the model gates them, else 1.
    pub fn shared_weights(&self, hidden: &[f32], shared_experts: usize) -> Vec<f32> {
        let Some(gate) = &self.shared_gate else {
            return vec![1.0; hidden.len() / self.d_model * shared_experts];
        };
        let mut logits = Vec::new();
        project_into(gate, self.d_model, hidden, &mut logits);
        logits.iter().map(|logit| 1.0 / (1.0 + (-logit).exp())).collect()
    }

    /// The score-correction bias of group-limited routing, when this gate has one.
    pub fn correction_bias(&self) -> Option<&[f32]> {
        self.correction_bias.as_deref()
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Writes the router's raw logits `x · W_gᵀ (+ bias)` of every row of `hidden`
    /// (`[tokens, d_model]`) into `logits`.
    pub fn logits_into(&self, hidden: &[f32], logits: &mut Vec<f32>) {
        project_into(&self.weights, self.d_model, hidden, logits);
        if let Some(bias) = &self.logit_bias {
            for row in logits.chunks_exact_mut(self.experts) {
                for (logit, bias) in row.iter_mut().zip(bias) {
                    *logit += bias;
                }
            }
        }
    }

    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        let mut logits = Vec::new();
        self.logits_into(hidden, &mut logits);
        logits
    }
}

/// `out = hidden · weightsᵀ` for row-major `hidden [tokens, d_model]` and `weights [rows, d_model]`.
///
/// Tokens go in blocks of [`TOKEN_BLOCK`], each weight row read once per block: a 256 x 7168 router
/// (7 MB) does not fit in cache, and reading it once per token made memory traffic, not arithmetic,
/// the gate's cost at DeepEP's sizes.
fn project_into(weights: &[f32], d_model: usize, hidden: &[f32], out: &mut Vec<f32>) {
    let rows = weights.len() / d_model;
    let tokens = hidden.len() / d_model;
    out.clear();
    out.resize(tokens * rows, 0.0);
    for (block_index, block) in hidden.chunks(TOKEN_BLOCK * d_model).enumerate() {
        let first_token = block_index * TOKEN_BLOCK;
        for (row, weight_row) in weights.chunks_exact(d_model).enumerate() {
            for (offset, token) in block.chunks_exact(d_model).enumerate() {
                out[(first_token + offset) * rows + row] = dot(token, weight_row);
            }
        }
    }
}

/// Tokens whose rows stay in cache while the gate's weight rows stream past them.
const TOKEN_BLOCK: usize = 16;

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
    fn blocked_projection_equals_the_token_by_token_one() {
        // 37 tokens: two full blocks and a partial one; d_model 19 exercises the dot's tail.
        let (tokens, experts, d_model) = (37, 5, 19);
        let value = |i: usize| ((i * 7919) % 101) as f32 / 50.0 - 1.0;
        let hidden: Vec<f32> = (0..tokens * d_model).map(value).collect();
        let weights: Vec<f32> = (0..experts * d_model).map(|i| value(i + 13)).collect();
        let gate = Gate::from_weights(weights.clone(), experts, d_model);
        let logits = gate.logits(&hidden);
        assert_eq!(logits.len(), tokens * experts);
        for (t, token) in hidden.chunks_exact(d_model).enumerate() {
            for (e, row) in weights.chunks_exact(d_model).enumerate() {
                assert_eq!(logits[t * experts + e], dot(token, row), "token {t} expert {e}");
            }
        }
    }

    #[test]
    fn dot_handles_tails_and_matches_the_naive_sum() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.1).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-4);
    }
}
