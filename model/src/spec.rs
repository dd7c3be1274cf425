//! The validated model specification: what every process agrees on about a model's MoE layers.

use switchyard_proto::v1;

use crate::capacity::CapacityPolicy;
use crate::dtype::WeightDtype;
use crate::family::Family;
use crate::ids::ExpertId;
use crate::router_spec::RouterSpec;

/// The expert feed-forward form.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// Mixtral's `w2(silu(w1 x) * w3 x)`: three matrices.
    SwiGlu,
    /// `w2(gelu(w1 x))`: two matrices.
    Gelu,
    /// `w2(relu(w1 x))`: two matrices (Switch Transformers' `DenseActDense` with `dense_act_fn = relu`).
    Relu,
    /// GPT-OSS's SwiGLU: `g = min(w1 x, limit)`, `u = clamp(w3 x, -limit, limit)`,
    /// `w2((u + 1) * g * sigmoid(alpha * g))`; three matrices, with biases in GPT-OSS.
    ClampedSwiGlu { alpha: f32, limit: f32 },
}

impl Activation {
    /// Number of `[d_ff, d_model]`-sized matrices one expert holds.
    pub fn matrices(self) -> usize {
        match self {
            Activation::SwiGlu | Activation::ClampedSwiGlu { .. } => 3,
            Activation::Gelu | Activation::Relu => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::SwiGlu => "swiglu",
            Activation::Gelu => "gelu",
            Activation::Relu => "relu",
            Activation::ClampedSwiGlu { .. } => "clamped-swiglu",
        }
    }

    /// GPT-OSS's constants.
    pub const GPT_OSS: Activation = Activation::ClampedSwiGlu { alpha: 1.702, limit: 7.0 };
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Activation::ClampedSwiGlu { alpha, limit } => write!(f, "clamped-swiglu (alpha {alpha}, limit {limit})"),
            other => f.write_str(other.name()),
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "swiglu" => Ok(Activation::SwiGlu),
            "gelu" => Ok(Activation::Gelu),
            "relu" => Ok(Activation::Relu),
            "clamped-swiglu" => Ok(Activation::GPT_OSS),
            other => Err(format!("unknown activation '{other}' (expected swiglu, gelu, relu or clamped-swiglu)")),
        }
    }
}

/// The capacity factor of synthetic models: GShard's and Switch Transformer's usual 1.25.
pub const DEFAULT_CAPACITY_FACTOR: f32 = 1.25;

/// A model whose fields were checked: every size is positive, top-k fits the experts, the router's
/// groups divide them, the MoE layers are numbered in ascending order.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    /// The architecture whose MoE block this model reproduces.
    pub family: Family,
    /// The MoE layers' numbers as the checkpoint numbers them, ascending (synthetic: `0..layers`).
    /// Expert keys and layer calls use these numbers; dense layers in between are not served.
    pub moe_layers: Vec<u32>,
    pub experts_per_layer: u32,
    pub d_model: u32,
    pub d_ff: u32,
    pub activation: Activation,
    /// The experts' linear layers have biases (GPT-OSS).
    pub expert_bias: bool,
    pub seed: u64,
    pub top_k: u32,
    pub router: RouterSpec,
    /// How many assignments an expert takes per call; the queue limit follows from it.
    pub capacity: CapacityPolicy,
    /// Always-on experts per layer, keyed `experts_per_layer + i`.
    pub shared_experts: u32,
    pub shared_d_ff: u32,
    /// Scale shared experts by a sigmoid gate (Qwen2-MoE).
    pub shared_expert_gate: bool,
    /// Where the weights come from: a checkpoint directory, or `None` for seeded synthetic weights.
    pub checkpoint: Option<String>,
    /// The dtype the checkpoint stores its experts in (`None` for synthetic weights): the dtype
    /// they are resident and compute in unless a worker is told otherwise.
    pub stored_dtype: Option<WeightDtype>,
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
    #[error("model.{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("model.{field} ({value}) is above the largest served, {max}")]
    TooLarge { field: &'static str, value: f64, max: f64 },
}

/// The largest sizes a served model may have: well above every published MoE (DeepSeek-V3:
/// d_model 7168, 256 routed experts and 61 layers; Mixtral: d_ff 14336; Qwen3: 128 experts), and
/// small enough that no product of them overflows. A spec comes from the network (`LoadExperts`)
/// and from files: without bounds one message asked a worker for terabytes and aborted it.
pub mod limits {
    pub const D_MODEL: u32 = 1 << 16;
    pub const D_FF: u32 = 1 << 18;
    pub const EXPERTS_PER_LAYER: u32 = 1 << 12;
    pub const SHARED_EXPERTS: u32 = 64;
    /// The highest layer index (and so the most MoE layers).
    pub const LAYER_INDEX: u32 = 1 << 10;
    pub const CAPACITY_FACTOR: f32 = 1024.0;
    pub const EXPERT_CAPACITY: u32 = 1 << 24;
}

impl ModelSpec {
    /// The default synthetic model of the README's main command and of `switchyard local`.
    pub fn default_synthetic() -> Self {
        Self {
            name: "synthetic".to_owned(),
            family: Family::Synthetic,
            moe_layers: vec![0],
            experts_per_layer: 8,
            d_model: 1024,
            d_ff: 4096,
            activation: Activation::SwiGlu,
            expert_bias: false,
            seed: 0,
            top_k: 2,
            router: RouterSpec::softmax_top_k(true),
            capacity: CapacityPolicy::Factor(DEFAULT_CAPACITY_FACTOR),
            shared_experts: 0,
            shared_d_ff: 0,
            shared_expert_gate: false,
            checkpoint: None,
            stored_dtype: None,
        }
    }

    /// The same model with `layers` MoE layers numbered `0..layers`.
    pub fn with_layers(self, layers: u32) -> Self {
        Self { moe_layers: (0..layers).collect(), ..self }
    }

    /// Number of MoE layers.
    pub fn layer_count(&self) -> u32 {
        self.moe_layers.len() as u32
    }

    /// Position of MoE layer `layer` among the MoE layers, or `None` when it is not one.
    pub fn layer_index(&self, layer: u32) -> Option<usize> {
        self.moe_layers.binary_search(&layer).ok()
    }

    /// The first MoE layer: where a load test goes unless told otherwise.
    pub fn first_layer(&self) -> u32 {
        self.moe_layers.first().copied().unwrap_or(0)
    }

    /// `[a, b, c]` for messages.
    pub fn describe_layers(&self) -> String {
        format!("{:?}", self.moe_layers)
    }

    /// One line for status output: family, name (once, where the name is the family's, as a
    /// synthetic model's is by default), layers, experts, sizes, top-k, capacity policy.
    pub fn summary(&self) -> String {
        let name = if self.name == self.family.to_string() {
            self.name.clone()
        } else {
            format!("{} {}", self.family, self.name)
        };
        format!(
            "{name}: MoE layers {} x {} experts, d_model {}, d_ff {}, top-{}, {}",
            self.describe_layers(),
            self.experts_per_layer,
            self.d_model,
            self.d_ff,
            self.top_k,
            self.capacity
        )
    }

    /// True for the keys of shared (always-on) experts.
    pub fn is_shared(&self, expert: u32) -> bool {
        expert >= self.experts_per_layer
    }

    /// Inner size of expert `expert` (routed or shared).
    pub fn d_ff_of(&self, expert: u32) -> u32 {
        if self.is_shared(expert) { self.shared_d_ff } else { self.d_ff }
    }

    /// Parameters of expert `expert`: its matrices and, with biases, one per output.
    pub fn expert_parameters_of(&self, expert: u32) -> u64 {
        let (d_model, d_ff) = (u64::from(self.d_model), u64::from(self.d_ff_of(expert)));
        let matrices = self.activation.matrices() as u64;
        // Shared experts are plain MLPs without biases in every family served.
        let biases = if self.expert_bias && !self.is_shared(expert) { (matrices - 1) * d_ff + d_model } else { 0 };
        matrices * d_model * d_ff + biases
    }

    /// Bytes of expert `expert`'s weights in `dtype`.
    pub fn expert_bytes_of(&self, expert: u32, dtype: WeightDtype) -> u64 {
        self.expert_parameters_of(expert) * dtype.element_size() as u64
    }

    /// The dtype experts are resident and compute in: the one `requested` (a worker's `--dtype`),
    /// else the checkpoint's own (a bf16 checkpoint is never upcast), else, for synthetic weights,
    /// bf16 on a GPU and f32 on a CPU, whose bf16 matrix products are several times slower.
    pub fn resident_dtype(&self, requested: Option<WeightDtype>, on_gpu: bool) -> WeightDtype {
        requested.or(self.stored_dtype).unwrap_or(if on_gpu { WeightDtype::Bf16 } else { WeightDtype::F32 })
    }

    /// The most assignments one expert takes from a call of `tokens` tokens, `None` when dropless.
    pub fn capacity(&self, tokens: usize) -> Option<usize> {
        self.capacity.capacity(tokens, self.top_k as usize, self.experts_per_layer as usize)
    }

    /// Parameters of the MoE layers (experts, shared experts, routers): `(total, active per token)`.
    pub fn moe_parameters(&self) -> (u64, u64) {
        let d_model = u64::from(self.d_model);
        let experts = u64::from(self.experts_per_layer);
        let routed = self.expert_parameters_of(0);
        let shared: u64 = (0..self.shared_experts).map(|i| self.expert_parameters_of(self.experts_per_layer + i)).sum();
        let shared_gates = if self.shared_expert_gate { u64::from(self.shared_experts) * d_model } else { 0 };
        let router_bias = if self.router.logit_bias { experts } else { 0 };
        let gates = experts * d_model + router_bias + shared_gates;
        let layers = u64::from(self.layer_count());
        let total = layers * (experts * routed + shared + gates);
        let active = layers * (u64::from(self.top_k) * routed + shared + gates);
        (total, active)
    }

    /// Every `(layer, expert)` of the model, routed then shared, layer-major.
    pub fn expert_keys(&self) -> impl Iterator<Item = ExpertId> + '_ {
        let per_layer = self.experts_per_layer + self.shared_experts;
        self.moe_layers.iter().flat_map(move |layer| (0..per_layer).map(move |expert| ExpertId::new(*layer, expert)))
    }

    pub fn contains(&self, key: &ExpertId) -> bool {
        self.layer_index(key.layer).is_some() && key.expert < self.experts_per_layer + self.shared_experts
    }

    pub fn to_proto(&self) -> v1::ModelSpec {
        let (alpha, limit) = match self.activation {
            Activation::ClampedSwiGlu { alpha, limit } => (alpha, limit),
            _ => (0.0, 0.0),
        };
        v1::ModelSpec {
            name: self.name.clone(),
            layers: self.layer_count(),
            moe_layers: self.moe_layers.clone(),
            family: self.family.to_proto() as i32,
            experts_per_layer: self.experts_per_layer,
            d_model: self.d_model,
            d_ff: self.d_ff,
            activation: match self.activation {
                Activation::SwiGlu => v1::Activation::Swiglu,
                Activation::Gelu => v1::Activation::Gelu,
                Activation::Relu => v1::Activation::Relu,
                Activation::ClampedSwiGlu { .. } => v1::Activation::ClampedSwiglu,
            } as i32,
            swiglu_alpha: alpha,
            swiglu_limit: limit,
            expert_bias: self.expert_bias,
            seed: self.seed,
            top_k: self.top_k,
            router: Some(self.router.to_proto()),
            keep_topk_softmax_weights: !self.router.renormalize,
            capacity_factor: match self.capacity {
                CapacityPolicy::Factor(factor) => factor,
                _ => 0.0,
            },
            dropless: self.capacity == CapacityPolicy::Dropless,
            expert_capacity: match self.capacity {
                CapacityPolicy::PerSequence(capacity) => capacity,
                _ => 0,
            },
            shared_experts: self.shared_experts,
            shared_d_ff: self.shared_d_ff,
            shared_expert_gate: self.shared_expert_gate,
            checkpoint: self.checkpoint.clone().unwrap_or_default(),
            stored_dtype: self.stored_dtype.map_or(v1::Dtype::Unspecified, WeightDtype::to_proto) as i32,
        }
    }

    /// The spec, if every size is positive and within [`limits`], top-k fits the experts, the
    /// router's groups divide them and the MoE layers ascend.
    pub fn validate(self) -> Result<Self, SpecError> {
        let sizes = [
            ("layers", self.layer_count()),
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
        let bounds = [
            ("experts_per_layer", self.experts_per_layer, limits::EXPERTS_PER_LAYER),
            ("d_model", self.d_model, limits::D_MODEL),
            ("d_ff", self.d_ff, limits::D_FF),
            ("shared_experts", self.shared_experts, limits::SHARED_EXPERTS),
            ("shared_d_ff", self.shared_d_ff, limits::D_FF),
            ("moe_layers", self.moe_layers.iter().copied().max().unwrap_or(0), limits::LAYER_INDEX),
        ];
        for (field, value, max) in bounds {
            if value > max {
                return Err(SpecError::TooLarge { field, value: f64::from(value), max: f64::from(max) });
            }
        }
        match self.capacity {
            CapacityPolicy::Factor(factor) if factor > limits::CAPACITY_FACTOR => {
                let (value, max) = (f64::from(factor), f64::from(limits::CAPACITY_FACTOR));
                return Err(SpecError::TooLarge { field: "capacity_factor", value, max });
            }
            CapacityPolicy::PerSequence(capacity) if capacity > limits::EXPERT_CAPACITY => {
                let (value, max) = (f64::from(capacity), f64::from(limits::EXPERT_CAPACITY));
                return Err(SpecError::TooLarge { field: "expert_capacity", value, max });
            }
            _ => {}
        }
        if self.moe_layers.windows(2).any(|pair| pair[0] >= pair[1]) {
            let reason = format!("{} must ascend without repeats", self.describe_layers());
            return Err(SpecError::Invalid { field: "moe_layers", reason });
        }
        match self.capacity {
            CapacityPolicy::Factor(factor) if !(factor > 0.0 && factor.is_finite()) => {
                return Err(SpecError::NotPositive { field: "capacity_factor", value: f64::from(factor) });
            }
            CapacityPolicy::PerSequence(0) => {
                return Err(SpecError::NotPositive { field: "expert_capacity", value: 0.0 });
            }
            _ => {}
        }
        if self.shared_experts > 0 && self.shared_d_ff == 0 {
            return Err(SpecError::NotPositive { field: "shared_d_ff", value: 0.0 });
        }
        if self.top_k > self.experts_per_layer {
            return Err(SpecError::TopKTooLarge { top_k: self.top_k, experts: self.experts_per_layer });
        }
        if let Activation::ClampedSwiGlu { alpha, limit } = self.activation
            && !(alpha.is_finite() && limit > 0.0 && limit.is_finite())
        {
            let reason = format!("alpha {alpha} and limit {limit} must be finite, the limit positive");
            return Err(SpecError::Invalid { field: "swiglu_limit", reason });
        }
        self.validate_router()?;
        Ok(self)
    }

    fn validate_router(&self) -> Result<(), SpecError> {
        let router = &self.router;
        let invalid = |reason: String| Err(SpecError::Invalid { field: "router", reason });
        if !(router.scaling > 0.0 && router.scaling.is_finite()) {
            return invalid(format!("scaling {} must be positive", router.scaling));
        }
        if router.groups == 0 || router.top_groups == 0 || router.top_groups > router.groups {
            return invalid(format!("top_groups {} must be in 1..={} (groups)", router.top_groups, router.groups));
        }
        if !self.experts_per_layer.is_multiple_of(router.groups) {
            return invalid(format!("{} groups do not divide {} experts", router.groups, self.experts_per_layer));
        }
        let selectable = router.top_groups * (self.experts_per_layer / router.groups);
        if selectable < self.top_k {
            return invalid(format!(
                "the best {} groups hold {selectable} experts, fewer than top_k {}",
                router.top_groups, self.top_k
            ));
        }
        Ok(())
    }
}

impl TryFrom<v1::ModelSpec> for ModelSpec {
    type Error = SpecError;

    fn try_from(wire: v1::ModelSpec) -> Result<Self, Self::Error> {
        let activation = match v1::Activation::try_from(wire.activation) {
            Ok(v1::Activation::Swiglu) => Activation::SwiGlu,
            Ok(v1::Activation::Gelu) => Activation::Gelu,
            Ok(v1::Activation::Relu) => Activation::Relu,
            Ok(v1::Activation::ClampedSwiglu) => {
                Activation::ClampedSwiGlu { alpha: wire.swiglu_alpha, limit: wire.swiglu_limit }
            }
            _ => return Err(SpecError::Activation(wire.activation)),
        };
        let family = Family::from_proto(wire.family).ok_or_else(|| SpecError::Invalid {
            field: "family",
            reason: format!("unspecified or unknown ({})", wire.family),
        })?;
        let router = RouterSpec::from_proto(wire.router, !wire.keep_topk_softmax_weights).map_err(|value| {
            SpecError::Invalid { field: "router", reason: format!("unknown scoring or group score ({value})") }
        })?;
        let capacity = match (wire.dropless, wire.expert_capacity) {
            (true, 0) => CapacityPolicy::Dropless,
            (false, 0) => CapacityPolicy::Factor(wire.capacity_factor),
            (false, capacity) => CapacityPolicy::PerSequence(capacity),
            (true, capacity) => {
                return Err(SpecError::Invalid {
                    field: "dropless",
                    reason: format!("a dropless model cannot also have expert_capacity {capacity}"),
                });
            }
        };
        // Bounded before the numbers are made: a wire `layers` of 2^32-1 would ask for 16 GiB here.
        let most_layers = limits::LAYER_INDEX + 1;
        if wire.layers > most_layers {
            return Err(SpecError::TooLarge {
                field: "layers",
                value: f64::from(wire.layers),
                max: f64::from(most_layers),
            });
        }
        let moe_layers = if wire.moe_layers.is_empty() {
            (0..wire.layers).collect()
        } else if wire.moe_layers.len() == wire.layers as usize {
            wire.moe_layers
        } else {
            return Err(SpecError::Invalid {
                field: "moe_layers",
                reason: format!("{} numbers for {} layers", wire.moe_layers.len(), wire.layers),
            });
        };
        let stored_dtype = WeightDtype::from_proto(wire.stored_dtype)
            .map_err(|reason| SpecError::Invalid { field: "stored_dtype", reason })?;
        ModelSpec {
            name: wire.name,
            family,
            moe_layers,
            experts_per_layer: wire.experts_per_layer,
            d_model: wire.d_model,
            d_ff: wire.d_ff,
            activation,
            expert_bias: wire.expert_bias,
            seed: wire.seed,
            top_k: wire.top_k,
            router,
            capacity,
            shared_experts: wire.shared_experts,
            shared_d_ff: wire.shared_d_ff,
            shared_expert_gate: wire.shared_expert_gate,
            checkpoint: (!wire.checkpoint.is_empty()).then_some(wire.checkpoint),
            stored_dtype,
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
    use crate::router_spec::{GroupScore, Scoring};

    #[test]
    fn a_summary_names_the_model_once_where_its_name_is_its_family() {
        let synthetic = ModelSpec::default_synthetic();
        assert!(synthetic.summary().starts_with("synthetic: MoE layers [0] x 8 experts"), "{}", synthetic.summary());
        let named = ModelSpec { name: "toy-moe".into(), ..ModelSpec::default_synthetic() };
        assert!(named.summary().starts_with("synthetic toy-moe: MoE layers"), "{}", named.summary());
    }

    /// A DeepSeek-V3-like spec: numbered layers, sigmoid group-limited router, dropless.
    fn deepseek_like() -> ModelSpec {
        ModelSpec {
            family: Family::DeepseekV3,
            moe_layers: vec![1, 2, 5],
            experts_per_layer: 8,
            router: RouterSpec {
                scoring: Scoring::Sigmoid,
                groups: 4,
                top_groups: 2,
                group_score: GroupScore::TopTwoSum,
                scaling: 2.5,
                correction_bias: true,
                ..RouterSpec::softmax_top_k(true)
            },
            capacity: CapacityPolicy::Dropless,
            shared_experts: 1,
            shared_d_ff: 64,
            ..ModelSpec::default_synthetic()
        }
    }

    #[test]
    fn round_trips_through_the_wire() {
        let spec = ModelSpec::default_synthetic();
        assert_eq!(ModelSpec::try_from(spec.to_proto()), Ok(spec));
        let deepseek = deepseek_like();
        assert_eq!(ModelSpec::try_from(deepseek.to_proto()), Ok(deepseek));
        let gpt_oss = ModelSpec {
            family: Family::GptOss,
            activation: Activation::ClampedSwiGlu { alpha: 1.702, limit: 7.0 },
            expert_bias: true,
            router: RouterSpec { logit_bias: true, ..RouterSpec::softmax_top_k(true) },
            ..ModelSpec::default_synthetic()
        };
        assert_eq!(ModelSpec::try_from(gpt_oss.to_proto()), Ok(gpt_oss));
        let switch = ModelSpec {
            family: Family::SwitchTransformers,
            activation: Activation::Relu,
            top_k: 1,
            capacity: CapacityPolicy::PerSequence(64),
            moe_layers: vec![1, 3],
            router: RouterSpec::softmax_top_k(false),
            ..ModelSpec::default_synthetic()
        };
        assert_eq!(ModelSpec::try_from(switch.to_proto()), Ok(switch));
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

        let mut wire = ModelSpec::default_synthetic().to_proto();
        wire.family = 0;
        assert!(ModelSpec::try_from(wire).unwrap_err().to_string().starts_with("model.family"));

        let mut wire = deepseek_like().to_proto();
        wire.moe_layers = vec![2, 1, 5];
        assert!(ModelSpec::try_from(wire).unwrap_err().to_string().starts_with("model.moe_layers: [2, 1, 5]"));

        let mut wire = deepseek_like().to_proto();
        wire.router.as_mut().expect("router").groups = 3;
        assert!(ModelSpec::try_from(wire).unwrap_err().to_string().contains("3 groups do not divide 8 experts"));

        let mut wire = deepseek_like().to_proto();
        wire.expert_capacity = 4;
        assert!(ModelSpec::try_from(wire).unwrap_err().to_string().starts_with("model.dropless"));
    }

    #[test]
    fn layers_keep_the_checkpoints_numbers() {
        let spec = deepseek_like();
        assert_eq!(spec.layer_count(), 3);
        assert_eq!((spec.layer_index(2), spec.layer_index(3)), (Some(1), None));
        assert_eq!(spec.first_layer(), 1);
        let later = ModelSpec { moe_layers: vec![3, 7], ..deepseek_like() };
        assert_eq!((later.first_layer(), ModelSpec::default_synthetic().first_layer()), (3, 0));
        assert!(spec.contains(&ExpertId::new(5, 8)) && !spec.contains(&ExpertId::new(0, 0)));
        let layers: Vec<u32> = spec.expert_keys().map(|key| key.layer).step_by(9).collect();
        assert_eq!(layers, [1, 2, 5]);
        assert_eq!(ModelSpec::default_synthetic().with_layers(3).moe_layers, [0, 1, 2]);
    }

    #[test]
    fn sizes_past_the_limits_are_refused_naming_the_field() {
        let base = ModelSpec::default_synthetic;
        let cases = [
            (ModelSpec { d_model: 1 << 20, d_ff: 1 << 20, ..base() }, "model.d_model (1048576)"),
            (ModelSpec { d_ff: u32::MAX, ..base() }, "model.d_ff (4294967295)"),
            (ModelSpec { experts_per_layer: 1_000_000_000, ..base() }, "model.experts_per_layer (1000000000)"),
            (ModelSpec { moe_layers: vec![0, u32::MAX], ..base() }, "model.moe_layers (4294967295)"),
            (ModelSpec { capacity: CapacityPolicy::Factor(1e9), ..base() }, "model.capacity_factor (1000000000)"),
            (ModelSpec { shared_experts: 1000, shared_d_ff: 64, ..base() }, "model.shared_experts (1000)"),
        ];
        for (spec, message) in cases {
            let error = spec.validate().unwrap_err();
            assert!(matches!(error, SpecError::TooLarge { .. }), "{error}");
            assert!(error.to_string().starts_with(message), "{error}");
        }
        let infinite = ModelSpec { capacity: CapacityPolicy::Factor(f32::INFINITY), ..base() }.validate();
        assert!(matches!(infinite, Err(SpecError::TooLarge { field: "capacity_factor", .. })));
        let nan = ModelSpec { capacity: CapacityPolicy::Factor(f32::NAN), ..base() }.validate();
        assert!(matches!(nan, Err(SpecError::NotPositive { field: "capacity_factor", .. })));
        let largest = ModelSpec { d_model: limits::D_MODEL, d_ff: limits::D_FF, ..base() };
        assert!(largest.validate().is_ok(), "the limits themselves are served");
    }

    /// Each rule of `validate` on both sides of its bound: the last value served, then the first
    /// refused, naming its field.
    #[test]
    fn each_rule_holds_at_its_boundary() {
        let base = ModelSpec::default_synthetic;
        let grouped = |top_groups, top_k| ModelSpec {
            top_k,
            router: RouterSpec { groups: 4, top_groups, ..RouterSpec::softmax_top_k(true) },
            ..base()
        };
        let router = |router: RouterSpec| ModelSpec { router, ..base() };
        let clamped = |alpha, limit| ModelSpec { activation: Activation::ClampedSwiGlu { alpha, limit }, ..base() };
        let served = [
            ModelSpec { capacity: CapacityPolicy::Factor(limits::CAPACITY_FACTOR), ..base() },
            ModelSpec { capacity: CapacityPolicy::Factor(1e-3), ..base() },
            ModelSpec { capacity: CapacityPolicy::PerSequence(limits::EXPERT_CAPACITY), ..base() },
            ModelSpec { capacity: CapacityPolicy::PerSequence(1), ..base() },
            ModelSpec { top_k: 8, ..base() },
            clamped(-1.0, 1e-3),
            router(RouterSpec { scaling: 1e-3, ..RouterSpec::softmax_top_k(true) }),
            grouped(4, 8),
            // 8 experts in 4 groups of 2: the best 2 groups hold 4 experts.
            grouped(2, 4),
        ];
        for spec in served {
            assert!(spec.clone().validate().is_ok(), "{spec:?}");
        }
        let refused = [
            (
                ModelSpec { capacity: CapacityPolicy::Factor(limits::CAPACITY_FACTOR * 1.001), ..base() },
                "capacity_factor",
            ),
            (ModelSpec { capacity: CapacityPolicy::Factor(0.0), ..base() }, "capacity_factor"),
            (ModelSpec { capacity: CapacityPolicy::Factor(-1.0), ..base() }, "capacity_factor"),
            (
                ModelSpec { capacity: CapacityPolicy::PerSequence(limits::EXPERT_CAPACITY + 1), ..base() },
                "expert_capacity",
            ),
            (ModelSpec { capacity: CapacityPolicy::PerSequence(0), ..base() }, "expert_capacity"),
            (ModelSpec { top_k: 9, ..base() }, "top_k"),
            (clamped(1.702, 0.0), "swiglu_limit"),
            (clamped(f32::NAN, 7.0), "swiglu_limit"),
            (clamped(1.702, f32::INFINITY), "swiglu_limit"),
            (router(RouterSpec { scaling: 0.0, ..RouterSpec::softmax_top_k(true) }), "router"),
            (router(RouterSpec { scaling: -1.0, ..RouterSpec::softmax_top_k(true) }), "router"),
            (router(RouterSpec { scaling: f32::INFINITY, ..RouterSpec::softmax_top_k(true) }), "router"),
            (grouped(0, 2), "router: top_groups 0 must be in 1..=4 (groups)"),
            (grouped(5, 2), "router: top_groups 5 must be in 1..=4 (groups)"),
            (grouped(2, 5), "router"),
            (grouped(1, 3), "router"),
        ];
        for (spec, message) in refused {
            let error = spec.clone().validate().expect_err(&format!("{spec:?}"));
            assert!(error.to_string().starts_with(&format!("model.{message}")), "{error}");
        }
    }

    #[test]
    fn activations_read_back_from_their_names() {
        for activation in [Activation::SwiGlu, Activation::Gelu, Activation::Relu] {
            assert_eq!(activation.name().parse(), Ok(activation));
            assert_eq!(activation.to_string(), activation.name());
            let spec = ModelSpec { activation, ..ModelSpec::default_synthetic() };
            assert_eq!(ModelSpec::try_from(spec.to_proto()), Ok(spec));
        }
        assert_eq!(Activation::GPT_OSS.name().parse(), Ok(Activation::GPT_OSS));
        assert_eq!(Activation::GPT_OSS.to_string(), "clamped-swiglu (alpha 1.702, limit 7)");
        assert!("silu".parse::<Activation>().unwrap_err().contains("unknown activation 'silu'"));
    }

    /// Found by the `model_spec` fuzz target: 2^32-1 layers on the wire made the layer numbers
    /// before any bound was checked (16 GiB, the process killed).
    #[test]
    fn a_wire_layer_count_past_the_limit_is_refused_before_numbering_them() {
        let wire =
            v1::ModelSpec { layers: u32::MAX, moe_layers: Vec::new(), ..ModelSpec::default_synthetic().to_proto() };
        let error = ModelSpec::try_from(wire).unwrap_err();
        assert_eq!(error.to_string(), "model.layers (4294967295) is above the largest served, 1025");
        let most = v1::ModelSpec {
            layers: limits::LAYER_INDEX + 1,
            moe_layers: Vec::new(),
            ..ModelSpec::default_synthetic().to_proto()
        };
        assert_eq!(ModelSpec::try_from(most).expect("the most layers").layer_count(), limits::LAYER_INDEX + 1);
    }

    #[test]
    fn capacity_follows_the_policy() {
        let spec = ModelSpec { top_k: 2, experts_per_layer: 8, ..ModelSpec::default_synthetic() };
        assert_eq!(spec.capacity(512), Some(160));
        assert_eq!(deepseek_like().capacity(512), None);
    }

    #[test]
    fn moe_parameters_count_experts_shared_experts_and_gates() {
        // Qwen2-MoE-like: 2 layers, 4 experts (d 32, ff 48), top-2, one gated shared expert (ff 80).
        let spec = ModelSpec {
            experts_per_layer: 4,
            d_model: 32,
            d_ff: 48,
            top_k: 2,
            shared_experts: 1,
            shared_d_ff: 80,
            shared_expert_gate: true,
            ..ModelSpec::default_synthetic()
        }
        .with_layers(2);
        // Per layer: 4 * 3*32*48 + 3*32*80 + (4*32 + 32) = 18432 + 7680 + 160; active: 2 experts.
        assert_eq!(spec.moe_parameters(), (2 * 26_272, 2 * (9_216 + 7_680 + 160)));
        // GPT-OSS-like experts carry 2*ff + d biases each; the router a bias per expert.
        let biased = ModelSpec {
            experts_per_layer: 4,
            d_model: 8,
            d_ff: 6,
            activation: Activation::GPT_OSS,
            expert_bias: true,
            router: RouterSpec { logit_bias: true, ..RouterSpec::softmax_top_k(true) },
            ..ModelSpec::default_synthetic()
        };
        // Two shared experts (DeepSeek-V2's `n_shared_experts` counts them): each in its own size.
        let two_shared = ModelSpec { shared_experts: 2, shared_expert_gate: false, ..spec.clone() };
        assert_eq!(two_shared.moe_parameters().0, 2 * (4 * 3 * 32 * 48 + 2 * 3 * 32 * 80 + 4 * 32));
        let expert = 3 * 8 * 6 + 2 * 6 + 8;
        assert_eq!(biased.expert_parameters_of(0), expert);
        assert_eq!(biased.moe_parameters().0, 4 * expert + 4 * 8 + 4);
    }

    /// Asked-for dtype first, then the checkpoint's, then the device's; and it travels on the wire.
    #[test]
    fn the_resident_dtype_follows_the_flag_then_the_checkpoint_then_the_device() {
        let synthetic = ModelSpec::default_synthetic();
        assert_eq!(synthetic.resident_dtype(None, false), WeightDtype::F32);
        assert_eq!(synthetic.resident_dtype(None, true), WeightDtype::Bf16);
        let bf16_checkpoint = ModelSpec { stored_dtype: Some(WeightDtype::Bf16), ..synthetic.clone() };
        assert_eq!(bf16_checkpoint.resident_dtype(None, false), WeightDtype::Bf16);
        assert_eq!(bf16_checkpoint.resident_dtype(Some(WeightDtype::F32), true), WeightDtype::F32);
        assert_eq!(ModelSpec::try_from(bf16_checkpoint.to_proto()), Ok(bf16_checkpoint.clone()));
        let mut wire = bf16_checkpoint.to_proto();
        wire.stored_dtype = 9;
        assert_eq!(ModelSpec::try_from(wire).unwrap_err().to_string(), "model.stored_dtype: unknown dtype 9");
    }

    #[test]
    fn sizes_and_keys() {
        let spec =
            ModelSpec { experts_per_layer: 3, d_model: 4, d_ff: 8, ..ModelSpec::default_synthetic() }.with_layers(2);
        assert_eq!(spec.expert_bytes_of(0, WeightDtype::F32), 3 * 4 * 8 * 4);
        assert_eq!(spec.expert_bytes_of(0, WeightDtype::Bf16), 3 * 4 * 8 * 2);
        let keys: Vec<_> = spec.expert_keys().map(|k| (k.layer, k.expert)).collect();
        assert_eq!(keys, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]);
        assert!(!spec.contains(&ExpertId::new(0, 3)));
        let shared = ModelSpec { shared_experts: 1, shared_d_ff: 16, ..spec };
        assert_eq!(shared.expert_keys().count(), 8);
        assert!(shared.contains(&ExpertId::new(1, 3)) && shared.is_shared(3) && !shared.is_shared(2));
        assert_eq!(shared.expert_bytes_of(3, WeightDtype::F32), 3 * 4 * 16 * 4);
        let missing_size = ModelSpec { shared_d_ff: 0, ..shared };
        assert!(ModelSpec::try_from(missing_size.to_proto()).unwrap_err().to_string().contains("shared_d_ff"));
    }
}
