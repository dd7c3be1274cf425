//! The model flags shared by `switchyard-coordinator` and `switchyard` (feature `clap`).

use crate::{Activation, ModelSpec, SpecError};

/// The synthetic model to serve. Weights are a pure function of (seed, layer, expert).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Serve a Mixtral or Qwen2-MoE safetensors checkpoint directory (config.json, *.safetensors)
    /// instead of a synthetic model: sizes, experts, top-k and normalisation come from it, and the
    /// synthetic model flags below are ignored (except --capacity-factor).
    #[arg(long, env = "SWITCHYARD_CHECKPOINT")]
    pub checkpoint: Option<std::path::PathBuf>,
    /// Model name shown in status and reports.
    #[arg(long = "model-name", env = "SWITCHYARD_MODEL_NAME", default_value = "synthetic")]
    pub name: String,
    /// MoE layers.
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
    /// Expert form: swiglu (Mixtral) or gelu.
    #[arg(long, env = "SWITCHYARD_ACTIVATION", default_value = "swiglu")]
    pub activation: Activation,
    /// Seed of the synthetic weights.
    #[arg(long, env = "SWITCHYARD_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Experts each token is routed to.
    #[arg(long, env = "SWITCHYARD_TOP_K", default_value_t = 2)]
    pub top_k: u32,
    /// Capacity factor clients apply by default.
    #[arg(long, env = "SWITCHYARD_CAPACITY_FACTOR", default_value_t = 1.25)]
    pub capacity_factor: f32,
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
            spec.capacity_factor = self.capacity_factor;
            return Ok(spec);
        }
        Ok(self.synthetic_spec()?)
    }

    fn synthetic_spec(&self) -> Result<ModelSpec, SpecError> {
        ModelSpec {
            name: self.name.clone(),
            layers: self.layers,
            experts_per_layer: self.experts,
            d_model: self.d_model,
            d_ff: self.d_ff,
            activation: self.activation,
            seed: self.seed,
            top_k: self.top_k,
            capacity_factor: self.capacity_factor,
            shared_experts: self.shared_experts,
            shared_d_ff: if self.shared_experts > 0 { self.shared_d_ff.unwrap_or(self.d_ff) } else { 0 },
            shared_expert_gate: self.shared_expert_gate,
            norm_topk_prob: true,
            checkpoint: None,
        }
        .to_proto()
        .try_into()
    }
}

/// The flags that make `ModelArgs` describe `spec` (for starting a coordinator as a child process).
pub fn flags_for(spec: &ModelSpec) -> Vec<String> {
    if let Some(checkpoint) = &spec.checkpoint {
        let flags = [("--checkpoint", checkpoint.clone()), ("--capacity-factor", spec.capacity_factor.to_string())];
        return flags.into_iter().flat_map(|(flag, value)| [flag.to_owned(), value]).collect();
    }
    [
        ("--model-name", spec.name.clone()),
        ("--layers", spec.layers.to_string()),
        ("--experts", spec.experts_per_layer.to_string()),
        ("--d-model", spec.d_model.to_string()),
        ("--d-ff", spec.d_ff.to_string()),
        ("--activation", spec.activation.name().to_owned()),
        ("--seed", spec.seed.to_string()),
        ("--top-k", spec.top_k.to_string()),
        ("--capacity-factor", spec.capacity_factor.to_string()),
        ("--shared-experts", spec.shared_experts.to_string()),
    ]
    .into_iter()
    .chain((spec.shared_experts > 0).then(|| ("--shared-d-ff", spec.shared_d_ff.to_string())))
    .flat_map(|(flag, value)| [flag.to_owned(), value])
    .chain(spec.shared_expert_gate.then(|| "--shared-expert-gate".to_owned()))
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

    #[test]
    fn flags_for_round_trips_through_the_parser() {
        let spec =
            ModelSpec { layers: 3, d_model: 64, seed: 9, capacity_factor: 0.75, ..ModelSpec::default_synthetic() };
        let mut argv = vec!["wrapper".to_owned()];
        argv.extend(flags_for(&spec));
        let parsed = Wrapper::try_parse_from(argv).expect("flags parse");
        assert_eq!(parsed.model.spec().ok(), Some(spec));
    }
}
