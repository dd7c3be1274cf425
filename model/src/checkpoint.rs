//! Real checkpoints: Mixtral and Qwen2-MoE safetensors directories, read by their public tensor
//! names, with sizes, top-k and normalisation from `config.json`.
//!
//! | | Mixtral | Qwen2-MoE |
//! | --- | --- | --- |
//! | router | `model.layers.{L}.block_sparse_moe.gate.weight` | `model.layers.{L}.mlp.gate.weight` |
//! | expert e | `...block_sparse_moe.experts.{e}.w1 / w3 / w2.weight` | `...mlp.experts.{e}.gate_proj / up_proj / down_proj.weight` |
//! | shared expert | none | `...mlp.shared_expert.{gate,up,down}_proj.weight`, gate `...mlp.shared_expert_gate.weight` |

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::safetensors::{TensorFileError, TensorFiles};
use crate::spec::{Activation, ModelSpec};

/// Which published architecture a checkpoint follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Mixtral,
    Qwen2Moe,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{file}: {reason}")]
    Config { file: PathBuf, reason: String },
    #[error(transparent)]
    Tensor(#[from] TensorFileError),
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: String,
    hidden_size: u32,
    num_hidden_layers: u32,
    num_experts_per_tok: u32,
    #[serde(default)]
    hidden_act: Option<String>,
    // Mixtral
    #[serde(default)]
    num_local_experts: Option<u32>,
    #[serde(default)]
    intermediate_size: Option<u32>,
    // Qwen2-MoE
    #[serde(default)]
    num_experts: Option<u32>,
    #[serde(default)]
    moe_intermediate_size: Option<u32>,
    #[serde(default)]
    shared_expert_intermediate_size: Option<u32>,
    #[serde(default)]
    norm_topk_prob: Option<bool>,
    #[serde(default)]
    decoder_sparse_step: Option<u32>,
    #[serde(default)]
    mlp_only_layers: Option<Vec<u32>>,
}

/// The three matrices of one SwiGLU expert, `nn.Linear` layout.
#[derive(Debug, Clone)]
pub struct ExpertMatrices {
    /// `[d_ff, d_model]`: gate branch (Mixtral w1, Qwen2 gate_proj).
    pub w1: Vec<f32>,
    /// `[d_model, d_ff]`: down projection (w2, down_proj).
    pub w2: Vec<f32>,
    /// `[d_ff, d_model]`: linear branch (w3, up_proj).
    pub w3: Vec<f32>,
}

/// An opened checkpoint directory. Only `config.json` and the safetensors headers are read up front.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub family: Family,
    pub spec: ModelSpec,
    files: TensorFiles,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let file = dir.join("config.json");
        let config_error = |reason: String| CheckpointError::Config { file: file.clone(), reason };
        let text = std::fs::read_to_string(&file).map_err(|error| config_error(error.to_string()))?;
        let config: HfConfig = serde_json::from_str(&text).map_err(|error| config_error(error.to_string()))?;
        if let Some(act) = config.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(config_error(format!("hidden_act {act}: only silu (SwiGLU experts) is supported")));
        }
        let required =
            |value: Option<u32>, field: &str| value.ok_or_else(|| config_error(format!("{field} is missing")));
        let (family, experts, d_ff, shared_d_ff, norm_topk_prob) = match config.model_type.as_str() {
            "mixtral" => (
                Family::Mixtral,
                required(config.num_local_experts, "num_local_experts")?,
                required(config.intermediate_size, "intermediate_size")?,
                0,
                true,
            ),
            "qwen2_moe" => {
                if config.decoder_sparse_step.unwrap_or(1) != 1
                    || config.mlp_only_layers.as_ref().is_some_and(|l| !l.is_empty())
                {
                    return Err(config_error(
                        "decoder_sparse_step / mlp_only_layers: checkpoints whose every layer is MoE are supported so far".into(),
                    ));
                }
                (
                    Family::Qwen2Moe,
                    required(config.num_experts, "num_experts")?,
                    required(config.moe_intermediate_size, "moe_intermediate_size")?,
                    config.shared_expert_intermediate_size.unwrap_or(0),
                    config.norm_topk_prob.unwrap_or(false),
                )
            }
            other => return Err(config_error(format!("model_type {other}: expected mixtral or qwen2_moe"))),
        };
        let name = dir.file_name().map_or_else(|| "checkpoint".to_owned(), |name| name.to_string_lossy().into_owned());
        let spec = ModelSpec {
            name,
            layers: config.num_hidden_layers,
            experts_per_layer: experts,
            d_model: config.hidden_size,
            d_ff,
            activation: Activation::SwiGlu,
            seed: 0,
            top_k: config.num_experts_per_tok,
            capacity_factor: 1.25,
            shared_experts: u32::from(shared_d_ff > 0),
            shared_d_ff,
            shared_expert_gate: shared_d_ff > 0,
            norm_topk_prob,
            checkpoint: Some(dir.display().to_string()),
        }
        .to_proto()
        .try_into()
        .map_err(|error: crate::SpecError| config_error(error.to_string()))?;
        Ok(Self { dir: dir.to_path_buf(), family, spec, files: TensorFiles::open(dir)? })
    }

    fn prefix(&self, layer: u32) -> String {
        match self.family {
            Family::Mixtral => format!("model.layers.{layer}.block_sparse_moe"),
            Family::Qwen2Moe => format!("model.layers.{layer}.mlp"),
        }
    }

    /// The router `W_g [experts, d_model]` of `layer`.
    pub fn gate_weights(&self, layer: u32) -> Result<Vec<f32>, CheckpointError> {
        let shape = [self.spec.experts_per_layer as usize, self.spec.d_model as usize];
        Ok(self.files.read_f32(&format!("{}.gate.weight", self.prefix(layer)), &shape)?)
    }

    /// The shared experts' gate `[shared_experts, d_model]` of `layer`, if the model has one.
    pub fn shared_gate_weights(&self, layer: u32) -> Result<Option<Vec<f32>>, CheckpointError> {
        if !self.spec.shared_expert_gate {
            return Ok(None);
        }
        let shape = [1, self.spec.d_model as usize];
        Ok(Some(self.files.read_f32(&format!("{}.shared_expert_gate.weight", self.prefix(layer)), &shape)?))
    }

    /// The matrices of expert `expert` of `layer` (indices past the routed experts are shared experts).
    pub fn expert_matrices(&self, layer: u32, expert: u32) -> Result<ExpertMatrices, CheckpointError> {
        let (d_model, d_ff) = (self.spec.d_model as usize, self.spec.d_ff_of(expert) as usize);
        let base = match (self.family, self.spec.is_shared(expert)) {
            (Family::Qwen2Moe, true) => format!("{}.shared_expert", self.prefix(layer)),
            _ => format!("{}.experts.{expert}", self.prefix(layer)),
        };
        let names = match self.family {
            Family::Mixtral => ["w1", "w2", "w3"],
            Family::Qwen2Moe => ["gate_proj", "down_proj", "up_proj"],
        };
        let read = |name: &str, shape: [usize; 2]| self.files.read_f32(&format!("{base}.{name}.weight"), &shape);
        Ok(ExpertMatrices {
            w1: read(names[0], [d_ff, d_model])?,
            w2: read(names[1], [d_model, d_ff])?,
            w3: read(names[2], [d_ff, d_model])?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
    }

    #[test]
    fn reads_the_config_of_each_family() {
        let mixtral = Checkpoint::open(&fixture("mixtral-tiny")).unwrap();
        assert_eq!(mixtral.family, Family::Mixtral);
        let spec = &mixtral.spec;
        assert_eq!((spec.layers, spec.experts_per_layer, spec.d_model, spec.d_ff, spec.top_k), (2, 4, 32, 64, 2));
        assert!(spec.norm_topk_prob && spec.shared_experts == 0);
        let qwen = Checkpoint::open(&fixture("qwen2-moe-tiny")).unwrap();
        let spec = &qwen.spec;
        assert_eq!((spec.experts_per_layer, spec.d_ff, spec.shared_experts, spec.shared_d_ff), (4, 48, 1, 80));
        assert!(!spec.norm_topk_prob && spec.shared_expert_gate);
        assert_eq!(qwen.expert_matrices(1, 4).unwrap().w2.len(), 32 * 80, "expert 4 is the shared expert");
        assert_eq!(qwen.gate_weights(0).unwrap().len(), 4 * 32);
    }

    #[test]
    fn a_missing_tensor_or_a_bad_config_is_named() {
        let mixtral = Checkpoint::open(&fixture("mixtral-tiny")).unwrap();
        let error = mixtral.expert_matrices(0, 9).unwrap_err().to_string();
        assert!(
            error.contains("model.layers.0.block_sparse_moe.experts.9.w1.weight") && error.contains("index.json"),
            "{error}"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_experts_per_tok": 1}"#,
        )
        .unwrap();
        let error = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(error.contains("config.json") && error.contains("model_type llama"), "{error}");
    }
}
