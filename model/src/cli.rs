//! The model flags shared by `switchyard-coordinator` and `switchyard` (feature `clap`).

use crate::{Activation, CapacityPolicy, DEFAULT_CAPACITY_FACTOR, ModelSpec, SpecError};

/// The synthetic model to serve. Weights are a pure function of (seed, layer, expert).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Serve a safetensors checkpoint directory (config.json, *.safetensors, sharded or not) of
    /// Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS, Granite-MoE or Switch
    /// Transformers instead of a synthetic model: layers, sizes, router, experts and the capacity
    /// policy come from it (dropless, except Switch Transformers' expert_capacity), and the synthetic
    /// model flags below are ignored (except the capacity flags).
    #[arg(long, env = "SWITCHYARD_CHECKPOINT")]
    pub checkpoint: Option<std::path::PathBuf>,
    /// Model name shown in status and reports.
    #[arg(long = "model-name", env = "SWITCHYARD_MODEL_NAME", default_value = "synthetic")]
    pub name: String,
    /// MoE layers of the synthetic model, numbered 0..layers.
    #[arg(long, env = "SWITCHYARD_LAYERS", default_value_t = 1)]
    pub layers: u32,
    /// Experts per MoE layer.
    #[arg(long, env = "SWITCHYARD_EXPERTS", default_value_t = 8)]
    pub experts: u32,
    /// Hidden size of the tokens.
    #[arg(long, env = "SWITCHYARD_D_MODEL", default_value_t = 1024)]
    pub d_model: u32,
    /// Inner size of each expert FFN.
    #[arg(long, env = "SWITCHYARD_D_FF", default_value_t = 4096)]
    pub d_ff: u32,
    /// Expert form: swiglu (Mixtral), gelu, relu or clamped-swiglu (GPT-OSS's, alpha 1.702, limit 7).
    #[arg(long, env = "SWITCHYARD_ACTIVATION", default_value = "swiglu")]
    pub activation: Activation,
    /// Seed of the synthetic weights.
    #[arg(long, env = "SWITCHYARD_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Experts each token is routed to.
    #[arg(long, env = "SWITCHYARD_TOP_K", default_value_t = 2)]
    pub top_k: u32,
    /// Give each expert a capacity of ceil(top_k x tokens / experts x FACTOR) per layer call; tokens
    /// past it are dropped (they keep their residual path). Default: 1.25 for synthetic models; a
    /// checkpoint's architecture decides for it (dropless, or Switch Transformers' expert_capacity).
    #[arg(long, env = "SWITCHYARD_CAPACITY_FACTOR", conflicts_with_all = ["dropless", "expert_capacity"])]
    pub capacity_factor: Option<f32>,
    /// Apply no capacity: every expert takes every token routed to it, nothing is ever dropped (the
    /// default for checkpoints of the dropless families). Each expert queue then admits up to the
    /// largest batch a client may send.
    #[arg(long, env = "SWITCHYARD_DROPLESS", conflicts_with = "expert_capacity")]
    pub dropless: bool,
    /// Give each expert a fixed capacity of N tokens per sequence, as Switch Transformers'
    /// expert_capacity does (a call is one sequence unless it says how it splits into sequences).
    #[arg(long, env = "SWITCHYARD_EXPERT_CAPACITY")]
    pub expert_capacity: Option<u32>,
    /// Always-on shared experts per layer (Qwen2-MoE, DeepSeek).
    #[arg(long, env = "SWITCHYARD_SHARED_EXPERTS", default_value_t = 0)]
    pub shared_experts: u32,
    /// Inner size of each shared expert (default: d_ff).
    #[arg(long, env = "SWITCHYARD_SHARED_D_FF")]
    pub shared_d_ff: Option<u32>,
    /// Scale shared experts by sigmoid(x · w_gate), as Qwen2-MoE's shared_expert_gate does.
    #[arg(long, env = "SWITCHYARD_SHARED_EXPERT_GATE")]
    pub shared_expert_gate: bool,
}

/// Why the model flags describe no servable model.
#[derive(Debug, thiserror::Error)]
pub enum ModelArgsError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
}

impl ModelArgs {
    pub fn spec(&self) -> Result<ModelSpec, ModelArgsError> {
        if let Some(dir) = &self.checkpoint {
            let mut spec = crate::checkpoint::Checkpoint::open(dir)?.spec;
            if let Some(capacity) = self.capacity_override() {
                spec.capacity = capacity;
            }
            return Ok(spec.validate()?);
        }
        Ok(self.synthetic_spec()?)
    }

    /// The capacity policy the operator asked for, if any.
    pub fn capacity_override(&self) -> Option<CapacityPolicy> {
        if self.dropless {
            return Some(CapacityPolicy::Dropless);
        }
        self.expert_capacity.map(CapacityPolicy::PerSequence).or(self.capacity_factor.map(CapacityPolicy::Factor))
    }

    fn synthetic_spec(&self) -> Result<ModelSpec, SpecError> {
        ModelSpec {
            name: self.name.clone(),
            experts_per_layer: self.experts,
            d_model: self.d_model,
            d_ff: self.d_ff,
            activation: self.activation,
            seed: self.seed,
            top_k: self.top_k,
            capacity: self.capacity_override().unwrap_or(CapacityPolicy::Factor(DEFAULT_CAPACITY_FACTOR)),
            shared_experts: self.shared_experts,
            shared_d_ff: if self.shared_experts > 0 { self.shared_d_ff.unwrap_or(self.d_ff) } else { 0 },
            shared_expert_gate: self.shared_expert_gate,
            ..ModelSpec::default_synthetic()
        }
        .with_layers(self.layers)
        .validate()
    }
}

/// The flag that sets `capacity` (a checkpoint's own policy needs none).
fn capacity_flags(capacity: CapacityPolicy) -> Vec<String> {
    match capacity {
        CapacityPolicy::Dropless => vec!["--dropless".to_owned()],
        CapacityPolicy::Factor(factor) => vec!["--capacity-factor".to_owned(), factor.to_string()],
        CapacityPolicy::PerSequence(capacity) => vec!["--expert-capacity".to_owned(), capacity.to_string()],
    }
}

/// The flags that make `ModelArgs` describe `spec` (for starting a coordinator as a child process).
pub fn flags_for(spec: &ModelSpec) -> Vec<String> {
    if let Some(checkpoint) = &spec.checkpoint {
        let mut flags = vec!["--checkpoint".to_owned(), checkpoint.clone()];
        // The checkpoint's own policy needs no flag: the command line stays what an operator types.
        let own =
            crate::checkpoint::Checkpoint::open(std::path::Path::new(checkpoint)).map(|opened| opened.spec.capacity);
        if own.ok() != Some(spec.capacity) {
            flags.extend(capacity_flags(spec.capacity));
        }
        return flags;
    }
    debug_assert_eq!(spec.moe_layers, (0..spec.layer_count()).collect::<Vec<_>>(), "synthetic layers are 0..layers");
    [
        ("--model-name", spec.name.clone()),
        ("--layers", spec.layer_count().to_string()),
        ("--experts", spec.experts_per_layer.to_string()),
        ("--d-model", spec.d_model.to_string()),
        ("--d-ff", spec.d_ff.to_string()),
        ("--activation", spec.activation.name().to_owned()),
        ("--seed", spec.seed.to_string()),
        ("--top-k", spec.top_k.to_string()),
        ("--shared-experts", spec.shared_experts.to_string()),
    ]
    .into_iter()
    .chain((spec.shared_experts > 0).then(|| ("--shared-d-ff", spec.shared_d_ff.to_string())))
    .flat_map(|(flag, value)| [flag.to_owned(), value])
    .chain(spec.shared_expert_gate.then(|| "--shared-expert-gate".to_owned()))
    .chain(capacity_flags(spec.capacity))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        model: ModelArgs,
    }

    fn parse(flags: &[String]) -> ModelSpec {
        let argv = std::iter::once("wrapper".to_owned()).chain(flags.iter().cloned());
        Wrapper::try_parse_from(argv).expect("flags parse").model.spec().expect("valid model")
    }

    #[test]
    fn flags_for_round_trips_through_the_parser() {
        let spec = ModelSpec {
            d_model: 64,
            seed: 9,
            capacity: CapacityPolicy::Factor(0.75),
            ..ModelSpec::default_synthetic()
        }
        .with_layers(3);
        assert_eq!(parse(&flags_for(&spec)), spec);
        let dropless = ModelSpec { capacity: CapacityPolicy::Dropless, ..spec };
        assert_eq!(parse(&flags_for(&dropless)), dropless);
    }

    fn fixture(name: &str) -> String {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name).display().to_string()
    }

    #[test]
    fn a_checkpoint_decides_the_capacity_unless_the_operator_overrides_it() {
        let mixtral = fixture("mixtral-tiny");
        let spec = parse(&["--checkpoint".into(), mixtral.clone()]);
        assert_eq!(spec.capacity, CapacityPolicy::Dropless, "Mixtral is dropless at inference");
        assert_eq!(flags_for(&spec), ["--checkpoint", mixtral.as_str()], "the default needs no capacity flag");
        let overridden = parse(&["--checkpoint".into(), mixtral.clone(), "--capacity-factor".into(), "1.25".into()]);
        assert_eq!(overridden.capacity, CapacityPolicy::Factor(1.25));
        assert_eq!(parse(&flags_for(&overridden)), overridden);
        let switch = parse(&["--checkpoint".into(), fixture("switch-transformers-tiny")]);
        assert_eq!(switch.capacity, CapacityPolicy::PerSequence(10), "Switch Transformers' own expert_capacity");
        let dropless_switch = parse(&["--checkpoint".into(), fixture("switch-transformers-tiny"), "--dropless".into()]);
        assert_eq!(parse(&flags_for(&dropless_switch)), dropless_switch);
        assert_eq!(parse(&[]).capacity, CapacityPolicy::Factor(1.25), "synthetic models keep the factor");
        let both = Wrapper::try_parse_from(["wrapper", "--dropless", "--capacity-factor", "2"]);
        assert!(both.unwrap_err().to_string().contains("cannot be used with"));
    }
}
