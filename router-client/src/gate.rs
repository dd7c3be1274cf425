//! The router's linear layer: `logits = x · W_gᵀ (+ b)`, `[tokens, experts]`.
//!
//! Plain Rust, not libtorch: one GEMM per call ([`Projection`]), which keeps the client's routing
//! path free of tch and `Sync`.

use std::sync::OnceLock;

use switchyard_model::ModelSpec;
use switchyard_model::checkpoint::{Checkpoint, CheckpointError};
use switchyard_model::synthetic;

use crate::projection::Projection;
use crate::routing::sigmoid;

#[derive(Debug, Clone)]
pub struct Gate {
    /// `W_g [experts, d_model]`: the gate's width and its experts are this matrix's.
    router: Projection,
    /// `W_noise [experts, d_model]` of noisy top-k gating.
    noise: Option<Projection>,
    /// The router's learned logit bias `[experts]` (GPT-OSS; Switch Transformers with `router_bias`).
    logit_bias: Option<Vec<f32>>,
    /// The score-correction bias `[experts]` of group-limited routing (DeepSeek-V3).
    correction_bias: Option<Vec<f32>>,
    /// The synthetic model this gate came from, so Soft MoE slot parameters can be built on demand.
    synthetic: Option<(ModelSpec, u32)>,
    /// Soft MoE's `Φ [experts * slots, d_model]`, built for the first slot count asked.
    soft_slots: OnceLock<(usize, Projection)>,
    /// Shared experts' sigmoid gates `[shared_experts, d_model]`, when the model gates them.
    shared_gate: Option<Projection>,
    /// Threads a large product may use ([`Projection::project_into`]).
    threads: usize,
}

impl Gate {
    /// The seeded gate of `layer` of a synthetic model, with seeded noise weights and bias.
    pub fn synthetic(spec: &ModelSpec, layer: u32) -> Self {
        let (experts, d_model) = (spec.experts_per_layer, spec.d_model);
        let weights = synthetic::gate_weights(spec.seed, layer, experts, d_model);
        let mut gate = Self::from_weights(weights, experts as usize, d_model as usize);
        let noise = synthetic::gate_noise_weights(spec.seed, layer, experts, d_model);
        gate.noise = Some(Projection::new(&noise, experts as usize, d_model as usize));
        gate.correction_bias = Some(synthetic::gate_bias(spec.seed, layer, experts));
        gate.synthetic = Some((spec.clone(), layer));
        if spec.shared_experts > 0 && spec.shared_expert_gate {
            let shared = synthetic::shared_gate_weights(spec.seed, layer, spec.shared_experts, d_model);
            gate.shared_gate = Some(Projection::new(&shared, spec.shared_experts as usize, d_model as usize));
        }
        gate
    }

    pub fn from_weights(weights: Vec<f32>, experts: usize, d_model: usize) -> Self {
        assert_eq!(weights.len(), experts * d_model, "gate weights must be [experts, d_model]");
        Self {
            router: Projection::new(&weights, experts, d_model),
            noise: None,
            logit_bias: None,
            correction_bias: None,
            synthetic: None,
            soft_slots: OnceLock::new(),
            shared_gate: None,
            threads: 1,
        }
    }

    /// Lets products of many rows use up to `threads` threads (the calling one among them).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// The router of `layer` of a checkpoint, with its biases and its shared-expert gate if it has them.
    pub fn from_checkpoint(checkpoint: &Checkpoint, layer: u32) -> Result<Self, CheckpointError> {
        let spec = &checkpoint.spec;
        let mut gate =
            Self::from_weights(checkpoint.gate_weights(layer)?, spec.experts_per_layer as usize, spec.d_model as usize);
        gate.logit_bias = checkpoint.gate_bias(layer)?;
        gate.correction_bias = checkpoint.correction_bias(layer)?;
        let d_model = spec.d_model as usize;
        gate.shared_gate = checkpoint
            .shared_gate_weights(layer)?
            .map(|weights| Projection::new(&weights, weights.len() / d_model.max(1), d_model));
        Ok(gate)
    }

    /// Threads a product of many rows may use (see [`Gate::with_threads`]).
    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn d_model(&self) -> usize {
        self.router.d_model()
    }

    /// Soft MoE's slot logits `x · Φᵀ`, `[tokens, experts * slots]`. A synthetic gate has seeded slot
    /// parameters; any other gate uses its router row of expert e for each slot of expert e.
    pub fn slot_logits(&self, hidden: &[f32], slots: usize) -> Vec<f32> {
        let build = || match &self.synthetic {
            Some((spec, layer)) => {
                let phi =
                    synthetic::soft_slot_weights(spec.seed, *layer, spec.experts_per_layer, slots as u32, spec.d_model);
                Projection::new(&phi, self.experts() * slots, self.d_model())
            }
            None => self.router.repeat_rows(slots),
        };
        let cached = self.soft_slots.get_or_init(|| (slots, build()));
        let rebuilt;
        let phi = if cached.0 == slots {
            &cached.1
        } else {
            rebuilt = build();
            &rebuilt
        };
        let mut logits = Vec::new();
        phi.project_into(hidden, &mut logits, self.threads);
        logits
    }

    /// `x · W_noiseᵀ`, when this gate has noise weights.
    pub fn noise_logits(&self, hidden: &[f32]) -> Option<Vec<f32>> {
        let mut logits = Vec::new();
        self.noise.as_ref()?.project_into(hidden, &mut logits, self.threads);
        Some(logits)
    }

    /// Each token's weight for each of `shared_experts` shared experts, `[tokens, shared_experts]`:
    /// `sigmoid(x · w_gate)` when the model gates them, else 1.
    pub fn shared_weights(&self, hidden: &[f32], shared_experts: usize) -> Vec<f32> {
        let Some(gate) = &self.shared_gate else {
            return vec![1.0; hidden.len() / self.d_model() * shared_experts];
        };
        let mut logits = Vec::new();
        gate.project_into(hidden, &mut logits, self.threads);
        logits.into_iter().map(sigmoid).collect()
    }

    /// The score-correction bias of group-limited routing, when this gate has one.
    pub fn correction_bias(&self) -> Option<&[f32]> {
        self.correction_bias.as_deref()
    }

    pub fn experts(&self) -> usize {
        self.router.rows()
    }

    /// Writes the router's raw logits `x · W_gᵀ (+ bias)` of every row of `hidden`
    /// (`[tokens, d_model]`) into `logits`.
    pub fn logits_into(&self, hidden: &[f32], logits: &mut Vec<f32>) {
        self.router.project_into(hidden, logits, self.threads);
        if let Some(bias) = &self.logit_bias {
            for row in logits.chunks_exact_mut(self.experts()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-1, 1) that vary with `i` without a short period.
    fn spread(i: usize) -> f32 {
        ((i * 7919) % 1009) as f32 / 500.0 - 1.0
    }

    /// The shared experts' gate, written out here rather than taken from the code under test.
    fn sigmoid(logit: f32) -> f32 {
        1.0 / (1.0 + (-logit).exp())
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum::<f64>() as f32
    }

    #[test]
    fn logits_are_row_dot_products() {
        let gate = Gate::from_weights(vec![1.0, 0.0, 0.0, 2.0, -1.0, 1.0], 3, 2);
        assert_eq!(gate.logits(&[3.0, 4.0, 0.5, -1.0]), [3.0, 8.0, 1.0, 0.5, -2.0, -1.5]);
    }

    /// `hidden · weightsᵀ` one dot product at a time: `[tokens, rows]`.
    fn naive_products(hidden: &[f32], weights: &[f32], d_model: usize) -> Vec<f32> {
        hidden
            .chunks_exact(d_model)
            .flat_map(|token| weights.chunks_exact(d_model).map(move |row| dot(token, row)))
            .collect()
    }

    fn assert_close(have: &[f32], want: &[f32], what: &str) {
        assert_eq!(have.len(), want.len(), "{what}");
        for (index, (have, want)) in have.iter().zip(want).enumerate() {
            assert!((have - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}[{index}]: {have} vs {want}");
        }
    }

    /// Every product a synthetic gate makes is its seeded weights' dot products: the noise logits,
    /// Soft MoE's slot logits (for a second slot count too), the shared experts' sigmoid gates.
    #[test]
    fn a_synthetic_gate_s_products_are_its_seeded_weights_dot_products() {
        let spec = ModelSpec {
            d_model: 12,
            experts_per_layer: 4,
            shared_experts: 2,
            shared_expert_gate: true,
            ..ModelSpec::default_synthetic()
        };
        let (layer, d_model, experts) = (1, 12, 4);
        let hidden: Vec<f32> = (0..3 * d_model as usize).map(spread).collect();
        let gate = Gate::synthetic(&spec, layer);
        assert_eq!(gate.d_model(), 12);
        assert_eq!(gate.correction_bias(), Some(&synthetic::gate_bias(spec.seed, layer, experts)[..]));
        let noise = synthetic::gate_noise_weights(spec.seed, layer, experts, d_model);
        let noise_logits = gate.noise_logits(&hidden).expect("a synthetic gate has noise weights");
        assert_close(&noise_logits, &naive_products(&hidden, &noise, 12), "noise logits");
        for slots in [2, 3] {
            let phi = synthetic::soft_slot_weights(spec.seed, layer, experts, slots, d_model);
            let want = naive_products(&hidden, &phi, 12);
            assert_close(&gate.slot_logits(&hidden, slots as usize), &want, &format!("{slots} slots' logits"));
        }
        let shared = synthetic::shared_gate_weights(spec.seed, layer, 2, d_model);
        let want: Vec<f32> = naive_products(&hidden, &shared, 12).into_iter().map(sigmoid).collect();
        assert_close(&gate.shared_weights(&hidden, 2), &want, "shared experts' gates");

        let ungated = Gate::synthetic(&ModelSpec { shared_expert_gate: false, ..spec.clone() }, layer);
        assert_eq!(ungated.shared_weights(&hidden, 2), [1.0; 6], "ungated shared experts weigh 1");
        let none_shared = Gate::synthetic(&ModelSpec { shared_experts: 0, ..spec }, layer);
        assert_eq!(none_shared.shared_weights(&hidden, 1), [1.0; 3]);
    }

    /// A checkpoint's router (no slot parameters) gives each of expert e's slots its router row;
    /// a learned logit bias is added to every token's logits.
    #[test]
    fn a_router_s_slots_use_its_expert_rows_and_its_bias_is_added() {
        let weights = vec![1.0, 0.0, 0.0, 2.0, -1.0, 1.0];
        let hidden = [3.0, 4.0, 0.5, -1.0];
        let mut gate = Gate::from_weights(weights, 3, 2);
        assert_eq!(gate.slot_logits(&hidden, 2), [3.0, 3.0, 8.0, 8.0, 1.0, 1.0, 0.5, 0.5, -2.0, -2.0, -1.5, -1.5]);
        assert_eq!(gate.noise_logits(&hidden), None);
        gate.logit_bias = Some(vec![0.5, -1.0, 2.0]);
        assert_eq!(gate.logits(&hidden), [3.5, 7.0, 3.0, 1.0, -3.0, 0.5]);
    }

    /// A checkpoint's router as the checkpoint holds it: logits are its `W_g` products plus its
    /// logit bias (GPT-OSS), the score-correction bias is DeepSeek-V3's, and Qwen2-MoE's shared
    /// expert is weighed by `sigmoid(x · w_gate)` of its `[1, d_model]` gate.
    #[test]
    fn a_checkpoint_s_gate_holds_its_router_biases_and_shared_expert_gate() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
        for name in ["qwen2-moe-tiny", "gpt-oss-tiny", "deepseek-v3-tiny"] {
            let checkpoint = Checkpoint::open(&fixtures.join(name)).unwrap();
            let (spec, layer) = (&checkpoint.spec, checkpoint.spec.moe_layers[0]);
            let d_model = spec.d_model as usize;
            let hidden: Vec<f32> = (0..3 * d_model).map(spread).collect();
            let gate = Gate::from_checkpoint(&checkpoint, layer).unwrap();
            let mut want = naive_products(&hidden, &checkpoint.gate_weights(layer).unwrap(), d_model);
            let logit_bias = checkpoint.gate_bias(layer).unwrap();
            assert_eq!(logit_bias.is_some(), name == "gpt-oss-tiny", "{name}: logit bias");
            for (logit, bias) in want.iter_mut().zip(logit_bias.iter().flatten().cycle()) {
                *logit += bias;
            }
            assert_close(&gate.logits(&hidden), &want, &format!("{name}: logits"));
            let correction_bias = checkpoint.correction_bias(layer).unwrap();
            assert_eq!(correction_bias.is_some(), name == "deepseek-v3-tiny", "{name}: correction bias");
            assert_eq!(gate.correction_bias(), correction_bias.as_deref(), "{name}");
            let shared = spec.shared_experts as usize;
            let want = match checkpoint.shared_gate_weights(layer).unwrap() {
                Some(weights) => naive_products(&hidden, &weights, d_model).into_iter().map(sigmoid).collect(),
                None => vec![1.0; 3 * shared],
            };
            assert_eq!(want.len(), 3 * shared, "{name}: one gate per shared expert");
            assert_eq!(spec.shared_expert_gate, name == "qwen2-moe-tiny", "{name}: shared expert gate");
            assert_close(&gate.shared_weights(&hidden, shared), &want, &format!("{name}: shared experts' weights"));
        }
    }

    /// Routing takes its thread count from the gate ([`Gate::threads`]): one unless raised, never 0.
    #[test]
    fn a_gate_s_threads_are_one_unless_raised_and_never_zero() {
        let gate = Gate::from_weights(vec![1.0, 0.0], 1, 2);
        assert_eq!(gate.threads(), 1);
        assert_eq!(gate.clone().with_threads(3).threads(), 3);
        assert_eq!(gate.with_threads(0).threads(), 1);
    }
}
