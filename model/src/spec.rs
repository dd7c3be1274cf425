//! The validated model specification: what every process agrees on about a model's MoE layers.

use switchyard_proto::v1;

/// The expert feed-forward form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Mixtral's `w2(silu(w1 x) * w3 x)`: three matrices.
    SwiGlu,
    /// `w2(gelu(w1 x))`: two matrices.
    Gelu,
}

impl Activation {
    /// Number of `[d_ff, d_model]`-sized matrices one expert holds.
    pub fn matrices(self) -> usize {
        match self {
            Activation::SwiGlu => 3,
            Activation::Gelu => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::SwiGlu => "swiglu",
            Activation::Gelu => "gelu",
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "swiglu" => Ok(Activation::SwiGlu),
            "gelu" => Ok(Activation::Gelu),
            other => Err(format!("unknown activation '{other}' (expected swiglu or gelu)")),
        }
    }
}

/// A model whose fields were checked: every size is positive and top-k fits the experts.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub layers: u32,
    pub experts_per_layer: u32,
    pub d_model: u32,
    pub d_ff: u32,
    pub activation: Activation,
    pub seed: u64,
    pub top_k: u32,
    pub capacity_factor: f32,
    /// Always-on experts per layer, keyed `experts_per_layer + i`.
    pub shared_experts: u32,
    pub shared_d_ff: u32,
    /// Scale shared experts by a sigmoid gate (Qwen2-MoE).
    pub shared_expert_gate: bool,
    /// Renormalise the k routing weights to sum to one (Mixtral; Qwen2-MoE's `norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// Where the weights come from: a checkpoint directory, or `None` for seeded synthetic weights.
    pub checkpoint: Option<String>,
}

/// A model spec field that cannot be served; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("model spec is missing")]
    Missing,
    #[error("model.{field} must be positive, got {value}")]
    NotPositive { field: &'static str, value: f64 },
    #[error("model.top_k ({top_k}) must be at most model.experts_per_layer ({experts})")]
    TopKTooLarge { top_k: u32, experts: u32 },
    #[error("model.activation is unspecified or unknown ({0})")]
    Activation(i32),
}

impl ModelSpec {
    /// The default synthetic model of the README's main command and of `switchyard local`.
    pub fn default_synthetic() -> Self {
        Self {
            name: "synthetic".to_owned(),
            layers: 1,
            experts_per_layer: 8,
            d_model: 1024,
            d_ff: 4096,
            activation: Activation::SwiGlu,
            seed: 0,
            top_k: 2,
            capacity_factor: 1.25,
            shared_experts: 0,
            shared_d_ff: 0,
            shared_expert_gate: false,
            norm_topk_prob: true,
            checkpoint: None,
        }
    }

    /// True for the keys of shared (always-on) experts.
    pub fn is_shared(&self, expert: u32) -> bool {
        expert >= self.experts_per_layer
    }

    /// Inner size of expert `expert` (routed or shared).
    pub fn d_ff_of(&self, expert: u32) -> u32 {
        if self.is_shared(expert) { self.shared_d_ff } else { self.d_ff }
    }

    /// Bytes of expert `expert`'s weights in f32.
    pub fn expert_bytes_of(&self, expert: u32) -> u64 {
        self.activation.matrices() as u64 * u64::from(self.d_model) * u64::from(self.d_ff_of(expert)) * 4
    }

    /// Bytes one expert's weights take in f32.
    pub fn expert_bytes(&self) -> u64 {
        self.activation.matrices() as u64 * u64::from(self.d_model) * u64::from(self.d_ff) * 4
    }

    /// The most assignments one expert takes from a batch of `tokens` tokens:
    /// `ceil(top_k * tokens / experts * capacity_factor)`.
    ///
    /// For top-1 this is Switch Transformer's `ceil(tokens / experts * capacity_factor)`; for top-k it
    /// counts the `top_k * tokens` assignments, as GShard, DeepSpeed-MoE and Tutel do, so a capacity
    /// factor of 1.0 means "a perfectly balanced batch just fits" whatever k is.
    pub fn capacity(&self, tokens: usize) -> usize {
        expert_capacity(tokens, self.top_k as usize, self.experts_per_layer as usize, self.capacity_factor)
    }

    /// Parameters of the MoE layers (experts, shared experts, gates): `(total, active per token)`.
    pub fn moe_parameters(&self) -> (u64, u64) {
        let (d_model, matrices) = (u64::from(self.d_model), self.activation.matrices() as u64);
        let routed = matrices * d_model * u64::from(self.d_ff);
        let shared = u64::from(self.shared_experts) * matrices * d_model * u64::from(self.shared_d_ff);
        let shared_gates = if self.shared_expert_gate { u64::from(self.shared_experts) * d_model } else { 0 };
        let gates = u64::from(self.experts_per_layer) * d_model + shared_gates;
        let layers = u64::from(self.layers);
        let total = layers * (u64::from(self.experts_per_layer) * routed + shared + gates);
        let active = layers * (u64::from(self.top_k) * routed + shared + gates);
        (total, active)
    }

    /// Every `(layer, expert)` of the model, routed then shared, layer-major.
    pub fn expert_keys(&self) -> impl Iterator<Item = v1::ExpertKey> + '_ {
        let per_layer = self.experts_per_layer + self.shared_experts;
        (0..self.layers).flat_map(move |layer| (0..per_layer).map(move |expert| v1::ExpertKey::new(layer, expert)))
    }

    pub fn contains(&self, key: &v1::ExpertKey) -> bool {
        key.layer < self.layers && key.expert < self.experts_per_layer + self.shared_experts
    }

    pub fn to_proto(&self) -> v1::ModelSpec {
        v1::ModelSpec {
            name: self.name.clone(),
            layers: self.layers,
            experts_per_layer: self.experts_per_layer,
            d_model: self.d_model,
            d_ff: self.d_ff,
            activation: match self.activation {
                Activation::SwiGlu => v1::Activation::Swiglu,
                Activation::Gelu => v1::Activation::Gelu,
            } as i32,
            seed: self.seed,
            top_k: self.top_k,
            capacity_factor: self.capacity_factor,
            shared_experts: self.shared_experts,
            shared_d_ff: self.shared_d_ff,
            shared_expert_gate: self.shared_expert_gate,
            keep_topk_softmax_weights: !self.norm_topk_prob,
            checkpoint: self.checkpoint.clone().unwrap_or_default(),
        }
    }

    /// The spec, if every size is positive and top-k fits the experts.
    pub fn validate(self) -> Result<Self, SpecError> {
        let sizes = [
            ("layers", self.layers),
            ("experts_per_layer", self.experts_per_layer),
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("top_k", self.top_k),
        ];
        for (field, value) in sizes {
            if value == 0 {
                return Err(SpecError::NotPositive { field, value: 0.0 });
            }
        }
        if self.capacity_factor.is_nan() || self.capacity_factor <= 0.0 {
            return Err(SpecError::NotPositive { field: "capacity_factor", value: f64::from(self.capacity_factor) });
        }
        if self.shared_experts > 0 && self.shared_d_ff == 0 {
            return Err(SpecError::NotPositive { field: "shared_d_ff", value: 0.0 });
        }
        if self.top_k > self.experts_per_layer {
            return Err(SpecError::TopKTooLarge { top_k: self.top_k, experts: self.experts_per_layer });
        }
        Ok(self)
    }
}

/// `ceil(top_k * tokens / experts * capacity_factor)`; see [`ModelSpec::capacity`].
pub fn expert_capacity(tokens: usize, top_k: usize, experts: usize, capacity_factor: f32) -> usize {
    let exact = (top_k * tokens) as f64 / experts as f64 * f64::from(capacity_factor);
    // Guard against 1e-15 overshoots (e.g. 64 * 2 / 8 * 1.0) turning an exact value into one more.
    (exact - 1e-9).ceil().max(0.0) as usize
}

impl TryFrom<v1::ModelSpec> for ModelSpec {
    type Error = SpecError;

    fn try_from(wire: v1::ModelSpec) -> Result<Self, Self::Error> {
        let activation = match v1::Activation::try_from(wire.activation) {
            Ok(v1::Activation::Swiglu) => Activation::SwiGlu,
            Ok(v1::Activation::Gelu) => Activation::Gelu,
            _ => return Err(SpecError::Activation(wire.activation)),
        };
        ModelSpec {
            name: wire.name,
            layers: wire.layers,
            experts_per_layer: wire.experts_per_layer,
            d_model: wire.d_model,
            d_ff: wire.d_ff,
            activation,
            seed: wire.seed,
            top_k: wire.top_k,
            capacity_factor: wire.capacity_factor,
            shared_experts: wire.shared_experts,
            shared_d_ff: wire.shared_d_ff,
            shared_expert_gate: wire.shared_expert_gate,
            norm_topk_prob: !wire.keep_topk_softmax_weights,
            checkpoint: (!wire.checkpoint.is_empty()).then_some(wire.checkpoint),
        }
        .validate()
    }
}

impl TryFrom<Option<v1::ModelSpec>> for ModelSpec {
    type Error = SpecError;

    fn try_from(wire: Option<v1::ModelSpec>) -> Result<Self, Self::Error> {
        wire.ok_or(SpecError::Missing)?.try_into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_wire() {
        let spec = ModelSpec::default_synthetic();
        assert_eq!(ModelSpec::try_from(spec.to_proto()), Ok(spec));
    }

    #[test]
    fn rejections_name_the_field() {
        let mut wire = ModelSpec::default_synthetic().to_proto();
        wire.d_ff = 0;
        let error = ModelSpec::try_from(wire).unwrap_err();
        assert_eq!(error.to_string(), "model.d_ff must be positive, got 0");

        let mut wire = ModelSpec::default_synthetic().to_proto();
        wire.top_k = 9;
        assert!(ModelSpec::try_from(wire).unwrap_err().to_string().contains("model.top_k (9)"));

        let mut wire = ModelSpec::default_synthetic().to_proto();
        wire.activation = 0;
        assert_eq!(ModelSpec::try_from(wire), Err(SpecError::Activation(0)));
        assert_eq!(ModelSpec::try_from(None), Err(SpecError::Missing));
    }

    #[test]
    fn capacity_follows_switch_for_top_1_and_counts_assignments_for_top_k() {
        assert_eq!(expert_capacity(64, 1, 8, 1.0), 8);
        assert_eq!(expert_capacity(64, 1, 8, 1.25), 10);
        assert_eq!(expert_capacity(64, 2, 8, 1.0), 16);
        assert_eq!(expert_capacity(10, 1, 8, 1.0), 2, "ceil(1.25)");
        assert_eq!(expert_capacity(64, 2, 8, 0.5), 8);
        assert_eq!(expert_capacity(0, 2, 8, 1.0), 0);
        let spec =
            ModelSpec { top_k: 2, experts_per_layer: 8, capacity_factor: 1.25, ..ModelSpec::default_synthetic() };
        assert_eq!(spec.capacity(512), 160);
    }

    #[test]
    fn moe_parameters_count_experts_shared_experts_and_gates() {
        // Qwen2-MoE-like: 2 layers, 4 experts (d 32, ff 48), top-2, one gated shared expert (ff 80).
        let spec = ModelSpec {
            layers: 2,
            experts_per_layer: 4,
            d_model: 32,
            d_ff: 48,
            top_k: 2,
            shared_experts: 1,
            shared_d_ff: 80,
            shared_expert_gate: true,
            ..ModelSpec::default_synthetic()
        };
        // Per layer: 4 * 3*32*48 + 3*32*80 + (4*32 + 32) = 18432 + 7680 + 160; active: 2 experts.
        assert_eq!(spec.moe_parameters(), (2 * 26_272, 2 * (9_216 + 7_680 + 160)));
    }

    #[test]
    fn sizes_and_keys() {
        let spec = ModelSpec { layers: 2, experts_per_layer: 3, d_model: 4, d_ff: 8, ..ModelSpec::default_synthetic() };
        assert_eq!(spec.expert_bytes(), 3 * 4 * 8 * 4);
        let keys: Vec<_> = spec.expert_keys().map(|k| (k.layer, k.expert)).collect();
        assert_eq!(keys, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]);
        assert!(!spec.contains(&v1::ExpertKey::new(0, 3)));
        let shared = ModelSpec { shared_experts: 1, shared_d_ff: 16, ..spec };
        assert_eq!(shared.expert_keys().count(), 8);
        assert!(shared.contains(&v1::ExpertKey::new(1, 3)) && shared.is_shared(3) && !shared.is_shared(2));
        assert_eq!(shared.expert_bytes_of(3), 3 * 4 * 16 * 4);
        let missing_size = ModelSpec { shared_d_ff: 0, ..shared };
        assert!(ModelSpec::try_from(missing_size.to_proto()).unwrap_err().to_string().contains("shared_d_ff"));
    }
}
