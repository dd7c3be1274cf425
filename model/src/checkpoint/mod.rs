//! Real checkpoints: safetensors directories (sharded or not, F32, F16 or BF16) of every family
//! Switchyard serves, read by their public tensor names, with sizes, layers, router and expert form
//! from `config.json` (`config`).
//!
//! | family | MoE block of layer L | router | experts |
//! | --- | --- | --- | --- |
//! | Mixtral | `model.layers.L.block_sparse_moe` | `gate.weight` | `experts.{e}.w1 / w3 / w2.weight` |
//! | Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 | `model.layers.L.mlp` | `gate.weight` (V3: + `gate.e_score_correction_bias`) | `experts.{e}.gate_proj / up_proj / down_proj.weight` |
//! | GPT-OSS | `model.layers.L.mlp` | `router.weight`, `router.bias` | fused: `experts.gate_up_proj [E, d, 2ff]` (gate and up interleaved) and `_bias`, `experts.down_proj [E, ff, d]` and `_bias`; or MXFP4 (`quant_method mxfp4`, as published): `gate_up_proj_blocks [E, 2ff, d/32, 16]` and `_scales [E, 2ff, d/32]`, `down_proj_blocks [E, d, ff/32, 16]` and `_scales` |
//! | Granite-MoE | `model.layers.L.block_sparse_moe` | `router.layer.weight` | fused: `input_linear.weight [E, 2ff, d]` (gate rows, then up rows), `output_linear.weight [E, d, ff]` |
//! | Switch Transformers | `encoder.block.B.layer.1.mlp` | `router.classifier.weight` (and `.bias` with `router_bias`) | `experts.expert_{e}.wi / wo.weight` |
//!
//! Shared experts: Qwen2-MoE's `shared_expert.{gate,up,down}_proj.weight` gated by
//! `shared_expert_gate.weight`; DeepSeek's `shared_experts.{gate,up,down}_proj.weight`, ungated.
//! Fused layouts are read one expert's slab at a time, so a worker reads only its experts' bytes.

mod config;

use std::path::{Path, PathBuf};

use crate::dtype::{HostTensor, WeightDtype};
use crate::family::Family;
use crate::mxfp4;
use crate::safetensors::{TensorFileError, TensorFiles};
use crate::spec::ModelSpec;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{file}: {reason}")]
    Config { file: PathBuf, reason: String },
    /// The directory has no `config.json`: a mistyped path, or the folder above the checkpoints.
    #[error("{dir} is not a checkpoint directory: {reason}")]
    NotACheckpoint { dir: PathBuf, reason: String },
    #[error(transparent)]
    Tensor(#[from] TensorFileError),
    #[error("layer {layer} of {family} checkpoint {dir} is not a MoE layer; its MoE layers are {moe_layers}")]
    NotMoeLayer { layer: u32, family: Family, dir: PathBuf, moe_layers: String },
    #[error("expert {expert} is not in {dir}: it has {routed} routed and {shared} shared experts per layer")]
    NoSuchExpert { expert: u32, dir: PathBuf, routed: u32, shared: u32 },
}

/// Names at most this many of the checkpoints a directory holds, in its error.
const CHECKPOINTS_NAMED: usize = 8;

/// Why `dir`, which has no `config.json`, is not a checkpoint; if it holds checkpoints, which.
fn not_a_checkpoint(dir: &Path) -> CheckpointError {
    let reason = match std::fs::read_dir(dir) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => "it does not exist".to_owned(),
        Err(error) if error.kind() == std::io::ErrorKind::NotADirectory => {
            "it is a file: pass the directory that holds config.json and the *.safetensors files".to_owned()
        }
        Err(error) => error.to_string(),
        Ok(entries) => {
            let mut held: Vec<String> = entries
                .filter_map(Result::ok)
                .filter(|entry| entry.path().join("config.json").is_file())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect();
            held.sort();
            match held.len() {
                0 => "it has no config.json (a checkpoint directory holds config.json and the *.safetensors files)"
                    .to_owned(),
                count if count > CHECKPOINTS_NAMED => format!(
                    "it has no config.json, but {count} directories in it do: {}, …",
                    held[..CHECKPOINTS_NAMED].join(", ")
                ),
                _ => format!("it has no config.json, but these directories in it do: {}", held.join(", ")),
            }
        }
    };
    CheckpointError::NotACheckpoint { dir: dir.to_path_buf(), reason }
}

/// The weights of one expert, in `nn.Linear` layout (`[out_features, in_features]`), in the dtype
/// the checkpoint stores them in.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// `[d_ff, d_model]`: the (gated) input projection (Mixtral w1, gate_proj, Switch wi).
    pub w1: HostTensor,
    /// `[d_model, d_ff]`: the down projection (w2, down_proj, Switch wo).
    pub w2: HostTensor,
    /// `[d_ff, d_model]`: the linear branch of the SwiGLU forms (w3, up_proj).
    pub w3: Option<HostTensor>,
    /// The linear layers' biases, when the family has them (GPT-OSS).
    pub biases: Option<ExpertBiases>,
}

impl ExpertWeights {
    /// Bytes of every tensor, as stored.
    pub fn bytes(&self) -> usize {
        let biases = self
            .biases
            .as_ref()
            .map_or(0, |b| b.b1.bytes.len() + b.b2.bytes.len() + b.b3.as_ref().map_or(0, |b3| b3.bytes.len()));
        self.w1.bytes.len() + self.w2.bytes.len() + self.w3.as_ref().map_or(0, |w3| w3.bytes.len()) + biases
    }
}

/// Biases of an expert's linear layers.
#[derive(Debug, Clone)]
pub struct ExpertBiases {
    /// `[d_ff]`.
    pub b1: HostTensor,
    /// `[d_model]`.
    pub b2: HostTensor,
    /// `[d_ff]`, three-matrix forms only.
    pub b3: Option<HostTensor>,
}

/// An opened checkpoint directory. Only `config.json` and the safetensors headers are read up front.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub family: Family,
    pub spec: ModelSpec,
    /// The experts are MXFP4-quantized (GPT-OSS as published); dequantized to bf16 at load.
    pub mxfp4_experts: bool,
    files: TensorFiles,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let file = dir.join("config.json");
        if !file.exists() {
            return Err(not_a_checkpoint(dir));
        }
        let config_error = |reason: String| CheckpointError::Config { file: file.clone(), reason };
        let mut text = String::new();
        crate::safetensors::open_regular(&file)
            .and_then(|mut opened| std::io::Read::read_to_string(&mut opened, &mut text))
            .map_err(|error| config_error(error.to_string()))?;
        let config = config::HfConfig::parse(&text).map_err(config_error)?;
        let family = config.family().map_err(config_error)?;
        let mxfp4_experts = config.mxfp4_experts(family).map_err(config_error)?;
        let name = dir.file_name().map_or_else(|| "checkpoint".to_owned(), |name| name.to_string_lossy().into_owned());
        let spec = config
            .spec(family, name, dir.display().to_string())
            .map_err(config_error)?
            .validate()
            .map_err(|error| config_error(error.to_string()))?;
        let mut checkpoint =
            Self { dir: dir.to_path_buf(), family, spec, mxfp4_experts, files: TensorFiles::open(dir)? };
        checkpoint.spec.stored_dtype = Some(checkpoint.stored_expert_dtype()?);
        Ok(checkpoint)
    }

    /// The dtype the routed experts are stored in, from a header (nothing is read); MXFP4 experts
    /// are served dequantized to bf16, as transformers does.
    fn stored_expert_dtype(&self) -> Result<WeightDtype, CheckpointError> {
        if self.mxfp4_experts {
            return Ok(WeightDtype::Bf16);
        }
        let block = self.block(self.spec.moe_layers[0]);
        let down_projection = match self.family {
            Family::Mixtral => format!("{block}.experts.0.w2.weight"),
            Family::SwitchTransformers => format!("{block}.experts.expert_0.wo.weight"),
            Family::GraniteMoe => format!("{block}.output_linear.weight"),
            Family::GptOss => format!("{block}.experts.down_proj"),
            _ => format!("{block}.experts.0.down_proj.weight"),
        };
        Ok(self.files.dtype(&down_projection)?)
    }

    /// The names of every tensor of the checkpoint.
    pub fn tensor_names(&self) -> Result<Vec<String>, CheckpointError> {
        Ok(self.files.names()?)
    }

    /// The shape of `tensor`.
    pub fn tensor_shape(&self, tensor: &str) -> Result<Vec<usize>, CheckpointError> {
        Ok(self.files.shape(tensor)?)
    }

    /// Refuses a layer that is not one of the MoE layers, naming the ones that are.
    pub fn check_layer(&self, layer: u32) -> Result<(), CheckpointError> {
        if self.spec.layer_index(layer).is_some() {
            return Ok(());
        }
        Err(CheckpointError::NotMoeLayer {
            layer,
            family: self.family,
            dir: self.dir.clone(),
            moe_layers: self.spec.describe_layers(),
        })
    }

    /// The prefix of layer `layer`'s MoE block.
    pub fn block(&self, layer: u32) -> String {
        match self.family {
            Family::Mixtral | Family::GraniteMoe => format!("model.layers.{layer}.block_sparse_moe"),
            Family::SwitchTransformers => format!("encoder.block.{layer}.layer.1.mlp"),
            _ => format!("model.layers.{layer}.mlp"),
        }
    }

    fn router_name(&self) -> &'static str {
        match self.family {
            Family::GptOss => "router",
            Family::GraniteMoe => "router.layer",
            Family::SwitchTransformers => "router.classifier",
            _ => "gate",
        }
    }

    /// The router `W_g [experts, d_model]` of `layer`.
    pub fn gate_weights(&self, layer: u32) -> Result<Vec<f32>, CheckpointError> {
        self.check_layer(layer)?;
        let shape = [self.spec.experts_per_layer as usize, self.spec.d_model as usize];
        Ok(self.files.read_f32(&format!("{}.{}.weight", self.block(layer), self.router_name()), &shape)?)
    }

    /// The router's logit bias `[experts]` of `layer` (GPT-OSS; Switch Transformers with `router_bias`).
    pub fn gate_bias(&self, layer: u32) -> Result<Option<Vec<f32>>, CheckpointError> {
        if !self.spec.router.logit_bias {
            return Ok(None);
        }
        self.check_layer(layer)?;
        let shape = [self.spec.experts_per_layer as usize];
        Ok(Some(self.files.read_f32(&format!("{}.{}.bias", self.block(layer), self.router_name()), &shape)?))
    }

    /// DeepSeek-V3's score-correction bias `[experts]` of `layer`.
    pub fn correction_bias(&self, layer: u32) -> Result<Option<Vec<f32>>, CheckpointError> {
        if !self.spec.router.correction_bias {
            return Ok(None);
        }
        self.check_layer(layer)?;
        let shape = [self.spec.experts_per_layer as usize];
        Ok(Some(self.files.read_f32(&format!("{}.gate.e_score_correction_bias", self.block(layer)), &shape)?))
    }

    /// The shared experts' gate `[shared_experts, d_model]` of `layer`, if the model has one.
    pub fn shared_gate_weights(&self, layer: u32) -> Result<Option<Vec<f32>>, CheckpointError> {
        if !self.spec.shared_expert_gate {
            return Ok(None);
        }
        self.check_layer(layer)?;
        let shape = [1, self.spec.d_model as usize];
        Ok(Some(self.files.read_f32(&format!("{}.shared_expert_gate.weight", self.block(layer)), &shape)?))
    }

    /// The weights of expert `expert` of `layer` (indices past the routed experts are shared experts).
    pub fn expert_weights(&self, layer: u32, expert: u32) -> Result<ExpertWeights, CheckpointError> {
        self.check_layer(layer)?;
        if expert >= self.spec.experts_per_layer + self.spec.shared_experts {
            return Err(CheckpointError::NoSuchExpert {
                expert,
                dir: self.dir.clone(),
                routed: self.spec.experts_per_layer,
                shared: self.spec.shared_experts,
            });
        }
        let (d_model, d_ff) = (self.spec.d_model as usize, self.spec.d_ff_of(expert) as usize);
        let block = self.block(layer);
        if self.spec.is_shared(expert) {
            let shared = if self.family == Family::Qwen2Moe { "shared_expert" } else { "shared_experts" };
            return self.swiglu_by_name(
                &format!("{block}.{shared}"),
                ["gate_proj", "up_proj", "down_proj"],
                d_model,
                d_ff,
            );
        }
        match self.family {
            Family::Mixtral => {
                self.swiglu_by_name(&format!("{block}.experts.{expert}"), ["w1", "w3", "w2"], d_model, d_ff)
            }
            Family::SwitchTransformers => {
                let base = format!("{block}.experts.expert_{expert}");
                Ok(ExpertWeights {
                    w1: self.files.read(&format!("{base}.wi.weight"), &[d_ff, d_model])?,
                    w2: self.files.read(&format!("{base}.wo.weight"), &[d_model, d_ff])?,
                    w3: None,
                    biases: None,
                })
            }
            Family::GraniteMoe => self.granite_expert(&block, expert as usize, d_model, d_ff),
            Family::GptOss => self.gpt_oss_expert(&block, expert as usize, d_model, d_ff),
            _ => self.swiglu_by_name(
                &format!("{block}.experts.{expert}"),
                ["gate_proj", "up_proj", "down_proj"],
                d_model,
                d_ff,
            ),
        }
    }

    /// A SwiGLU expert stored as three `nn.Linear` weights named `[gate, up, down]` under `base`.
    fn swiglu_by_name(
        &self,
        base: &str,
        [gate, up, down]: [&str; 3],
        d_model: usize,
        d_ff: usize,
    ) -> Result<ExpertWeights, CheckpointError> {
        let read = |name: &str, shape: [usize; 2]| self.files.read(&format!("{base}.{name}.weight"), &shape);
        Ok(ExpertWeights {
            w1: read(gate, [d_ff, d_model])?,
            w2: read(down, [d_model, d_ff])?,
            w3: Some(read(up, [d_ff, d_model])?),
            biases: None,
        })
    }

    /// Granite-MoE: `input_linear.weight [E, 2ff, d]` holds the gate rows then the up rows (the
    /// forward chunks its output in two), `output_linear.weight [E, d, ff]` the down projection.
    fn granite_expert(
        &self,
        block: &str,
        expert: usize,
        d_model: usize,
        d_ff: usize,
    ) -> Result<ExpertWeights, CheckpointError> {
        let experts = self.spec.experts_per_layer as usize;
        let gate_up =
            self.files.read_slab(&format!("{block}.input_linear.weight"), &[experts, 2 * d_ff, d_model], expert)?;
        let (gate, up) = gate_up.split_rows(d_ff);
        let down = self.files.read_slab(&format!("{block}.output_linear.weight"), &[experts, d_model, d_ff], expert)?;
        Ok(ExpertWeights { w1: gate, w2: down, w3: Some(up), biases: None })
    }

    /// GPT-OSS: `x @ gate_up_proj[e] + bias` with `gate_up_proj [E, d, 2ff]` whose even columns are
    /// the gate and odd columns the up projection; `h @ down_proj[e] + bias` with `[E, ff, d]`.
    /// Transposed (or, from MXFP4, dequantized) and de-interleaved here into `nn.Linear` layout, once,
    /// at load.
    fn gpt_oss_expert(
        &self,
        block: &str,
        expert: usize,
        d_model: usize,
        d_ff: usize,
    ) -> Result<ExpertWeights, CheckpointError> {
        let experts = self.spec.experts_per_layer as usize;
        let base = format!("{block}.experts");
        let gate_up_bias = self.files.read_slab(&format!("{base}.gate_up_proj_bias"), &[experts, 2 * d_ff], expert)?;
        let down_bias = self.files.read_slab(&format!("{base}.down_proj_bias"), &[experts, d_model], expert)?;
        // Both forms to `nn.Linear` layout: gate_up `[2ff, d]` (gate and up rows interleaved), down `[d, ff]`.
        let (gate_up, w2) = if self.mxfp4_experts {
            (
                self.mxfp4_slab(&format!("{base}.gate_up_proj"), experts, 2 * d_ff, d_model, expert)?,
                self.mxfp4_slab(&format!("{base}.down_proj"), experts, d_model, d_ff, expert)?,
            )
        } else {
            let gate_up =
                self.files.read_slab(&format!("{base}.gate_up_proj"), &[experts, d_model, 2 * d_ff], expert)?;
            let down = self.files.read_slab(&format!("{base}.down_proj"), &[experts, d_ff, d_model], expert)?;
            (gate_up.transposed(), down.transposed())
        };
        Ok(ExpertWeights {
            w1: gate_up.every_nth_row(0, 2),
            w2,
            w3: Some(gate_up.every_nth_row(1, 2)),
            biases: Some(ExpertBiases {
                b1: gate_up_bias.every_nth_row(0, 2),
                b2: down_bias,
                b3: Some(gate_up_bias.every_nth_row(1, 2)),
            }),
        })
    }
}

impl Checkpoint {
    /// Expert `expert` of the MXFP4 tensor pair `{name}_blocks` / `{name}_scales`, dequantized to a
    /// `[rows, cols]` bf16 matrix (`nn.Linear` layout: `cols` is the input size). Every MXFP4 value
    /// is exact in bf16: a 2-bit mantissa times a power of two.
    fn mxfp4_slab(
        &self,
        name: &str,
        experts: usize,
        rows: usize,
        cols: usize,
        expert: usize,
    ) -> Result<HostTensor, CheckpointError> {
        let groups = cols.div_ceil(mxfp4::BLOCK);
        let blocks =
            self.files.read_u8_slab(&format!("{name}_blocks"), &[experts, rows, groups, mxfp4::BLOCK / 2], expert)?;
        let scales = self.files.read_u8_slab(&format!("{name}_scales"), &[experts, rows, groups], expert)?;
        let values = mxfp4::dequantize(&blocks, &scales, rows, groups * mxfp4::BLOCK);
        Ok(HostTensor::from_f32(&values, &[rows, groups * mxfp4::BLOCK]).to_dtype(WeightDtype::Bf16))
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
        assert_eq!(
            (spec.layer_count(), spec.experts_per_layer, spec.d_model, spec.d_ff, spec.top_k),
            (2, 4, 32, 64, 2)
        );
        assert!(spec.router.renormalize && spec.shared_experts == 0 && spec.capacity.is_dropless());
        let qwen = Checkpoint::open(&fixture("qwen2-moe-tiny")).unwrap();
        let spec = &qwen.spec;
        assert_eq!(spec.moe_layers, [0, 2], "layer 1 is in mlp_only_layers");
        assert_eq!((spec.experts_per_layer, spec.d_ff, spec.shared_experts, spec.shared_d_ff), (4, 48, 1, 80));
        assert!(!spec.router.renormalize && spec.shared_expert_gate);
        assert_eq!(qwen.expert_weights(2, 4).unwrap().w2.shape, [32, 80], "expert 4 is the shared expert");
        assert_eq!(qwen.gate_weights(0).unwrap().len(), 4 * 32);
        let switch = Checkpoint::open(&fixture("switch-transformers-tiny")).unwrap();
        assert_eq!(switch.spec.moe_layers, [1, 3]);
        assert_eq!(switch.spec.capacity, crate::CapacityPolicy::PerSequence(10));
    }

    /// Every fixture checkpoint but the MXFP4 ones (which hold bytes, not values), opened.
    fn unquantized_fixtures() -> impl Iterator<Item = (PathBuf, Checkpoint)> {
        std::fs::read_dir(fixture(""))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|dir| dir.join("config.json").exists())
            .map(|dir| {
                let checkpoint = Checkpoint::open(&dir).unwrap();
                (dir, checkpoint)
            })
            .filter(|(_, checkpoint)| !checkpoint.mxfp4_experts)
    }

    /// Each accessor reads the tensors meant for it, and together they read every value under each
    /// MoE block of every unquantized fixture: the router, its logit and correction biases, the
    /// shared experts' gate and each routed and shared expert with its biases.
    #[test]
    fn the_accessors_read_every_value_of_each_moe_block() {
        for (dir, checkpoint) in unquantized_fixtures() {
            let spec = &checkpoint.spec;
            let (experts, d_model) = (spec.experts_per_layer as usize, spec.d_model as usize);
            let names = checkpoint.tensor_names().unwrap();
            let (mut stored, mut read) = (0, 0);
            for &layer in &spec.moe_layers {
                let prefix = format!("{}.", checkpoint.block(layer));
                for tensor in names.iter().filter(|t| t.starts_with(&prefix)) {
                    stored += checkpoint.tensor_shape(tensor).unwrap().iter().product::<usize>();
                }
                assert_eq!(checkpoint.gate_weights(layer).unwrap().len(), experts * d_model);
                let gate_bias = checkpoint.gate_bias(layer).unwrap().map(|bias| bias.len());
                assert_eq!(gate_bias, spec.router.logit_bias.then_some(experts), "{}", dir.display());
                let correction = checkpoint.correction_bias(layer).unwrap().map(|bias| bias.len());
                assert_eq!(correction, spec.router.correction_bias.then_some(experts), "{}", dir.display());
                let shared_gate = checkpoint.shared_gate_weights(layer).unwrap().map(|gate| gate.len());
                assert_eq!(shared_gate, spec.shared_expert_gate.then_some(d_model), "{}", dir.display());
                read += experts * d_model + gate_bias.unwrap_or(0) + correction.unwrap_or(0) + shared_gate.unwrap_or(0);
                for expert in 0..spec.experts_per_layer + spec.shared_experts {
                    let weights = checkpoint.expert_weights(layer, expert).unwrap();
                    let biases = weights.biases.iter().flat_map(|b| [Some(&b.b1), Some(&b.b2), b.b3.as_ref()]);
                    read += [Some(&weights.w1), Some(&weights.w2), weights.w3.as_ref()]
                        .into_iter()
                        .chain(biases)
                        .flatten()
                        .map(|tensor| tensor.shape.iter().product::<usize>())
                        .sum::<usize>();
                }
            }
            assert_eq!(read, stored, "{}", dir.display());
        }
    }

    /// The spec's parameter count (what `switchyard model-info` prints) against the tensors the
    /// checkpoint actually holds under each MoE block (buffers such as DeepSeek-V3's correction bias
    /// are not parameters; an MXFP4 checkpoint holds bytes, not parameters, so it is not listed).
    #[test]
    fn moe_parameters_equal_the_tensors_of_the_moe_blocks() {
        for (dir, checkpoint) in unquantized_fixtures() {
            let name = dir.display();
            let names = checkpoint.tensor_names().unwrap();
            let mut counted = 0u64;
            for layer in &checkpoint.spec.moe_layers {
                let prefix = format!("{}.", checkpoint.block(*layer));
                for tensor in names.iter().filter(|t| t.starts_with(&prefix) && !t.ends_with("e_score_correction_bias"))
                {
                    counted += checkpoint.tensor_shape(tensor).unwrap().iter().product::<usize>() as u64;
                }
            }
            assert_eq!(checkpoint.spec.moe_parameters().0, counted, "{name}");
        }
    }

    #[test]
    fn mxfp4_experts_dequantize_to_the_values_transformers_computed_with() {
        // Every dequantized weight is an E2M1 value times a power of two; that the layer computes with
        // exactly transformers' dequantized weights is shown by the hf_fixtures and checkpoints tests.
        let mxfp4 = Checkpoint::open(&fixture("gpt-oss-mxfp4-tiny")).unwrap();
        assert!(mxfp4.mxfp4_experts);
        let weights = mxfp4.expert_weights(1, 3).unwrap();
        assert_eq!((weights.w1.len(), weights.w2.len(), weights.w1.dtype), (32 * 32, 32 * 32, WeightDtype::Bf16));
        let fp4 = [0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for value in weights.w1.to_f32().iter().chain(&weights.w2.to_f32()) {
            let (mantissa, _) = frexp(value.abs());
            assert!(*value == 0.0 || fp4.iter().any(|m| frexp(*m).0 == mantissa), "{value} is not an FP4 value x 2^k");
        }
    }

    /// `x = m * 2^e` with `m` in [0.5, 1).
    fn frexp(x: f32) -> (f32, i32) {
        if x == 0.0 {
            return (0.0, 0);
        }
        let exponent = x.log2().floor() as i32 + 1;
        (x / 2f32.powi(exponent), exponent)
    }

    #[test]
    fn fused_layouts_are_read_one_expert_at_a_time() {
        let granite = Checkpoint::open(&fixture("granitemoe-tiny")).unwrap();
        let weights = granite.expert_weights(1, 3).unwrap();
        assert_eq!(
            (weights.w1.len(), weights.w2.len(), weights.w3.map(|w| w.len())),
            (40 * 32, 32 * 40, Some(40 * 32))
        );
        let gpt_oss = Checkpoint::open(&fixture("gpt-oss-tiny")).unwrap();
        let weights = gpt_oss.expert_weights(0, 2).unwrap();
        assert_eq!(weights.w1.dtype, WeightDtype::Bf16, "read as stored");
        let stored = 2 * (32 * 2 * 24 + 2 * 24 + 24 * 32 + 32);
        assert_eq!(weights.bytes(), stored, "the expert's slabs of the four fused tensors, nothing more");
        let biases = weights.biases.expect("GPT-OSS experts have biases");
        assert_eq!((biases.b1.len(), biases.b2.len(), weights.w2.len()), (24, 32, 32 * 24));
        assert!(gpt_oss.gate_bias(1).unwrap().is_some());
    }

    #[test]
    fn a_missing_tensor_a_dense_layer_or_a_bad_config_is_named() {
        let mixtral = Checkpoint::open(&fixture("mixtral-tiny")).unwrap();
        let error = mixtral.expert_weights(0, 9).unwrap_err().to_string();
        assert!(error.starts_with("expert 9 is not in") && error.ends_with("4 routed and 0 shared experts per layer"));
        let copy = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(fixture("mixtral-tiny")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
        let index = copy.path().join("model.safetensors.index.json");
        let text = std::fs::read_to_string(&index).unwrap();
        std::fs::write(&index, text.replace("model.layers.0.block_sparse_moe.experts.3.w1.weight", "renamed")).unwrap();
        let error = Checkpoint::open(copy.path()).unwrap().expert_weights(0, 3).unwrap_err().to_string();
        assert!(
            error.contains("model.layers.0.block_sparse_moe.experts.3.w1.weight") && error.contains("index.json"),
            "{error}"
        );
        let deepseek = Checkpoint::open(&fixture("deepseek-v3-tiny")).unwrap();
        let error = deepseek.gate_weights(0).unwrap_err().to_string();
        assert!(error.contains("layer 0 of DeepSeek-V3") && error.ends_with("its MoE layers are [1, 2]"), "{error}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_experts_per_tok": 1}"#,
        )
        .unwrap();
        let error = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(error.contains("config.json") && error.contains("model_type \"llama\""), "{error}");
    }

    /// A path that is no checkpoint says why, and where it is the folder above checkpoints, names
    /// them.
    #[test]
    fn a_directory_without_config_json_is_named_with_the_checkpoints_it_holds() {
        let above = Checkpoint::open(&fixture("")).unwrap_err().to_string();
        assert!(
            above.contains("is not a checkpoint directory: it has no config.json, but ")
                && above.contains(" directories in it do: deepseek-v2-lite-tiny, deepseek-v3-tiny, "),
            "{above}"
        );
        let missing = Checkpoint::open(&fixture("no-such-model")).unwrap_err().to_string();
        assert!(missing.ends_with("no-such-model is not a checkpoint directory: it does not exist"), "{missing}");
        let empty = tempfile::tempdir().unwrap();
        let error = Checkpoint::open(empty.path()).unwrap_err().to_string();
        assert!(
            error.ends_with(
                "it has no config.json (a checkpoint directory holds config.json and the *.safetensors files)"
            ),
            "{error}"
        );
        let add_checkpoints = |indices: std::ops::Range<usize>| {
            for index in indices {
                std::fs::create_dir(empty.path().join(format!("model-{index}"))).unwrap();
                std::fs::write(empty.path().join(format!("model-{index}/config.json")), "{}").unwrap();
            }
        };
        add_checkpoints(0..2);
        let two = Checkpoint::open(empty.path()).unwrap_err().to_string();
        assert!(two.ends_with("it has no config.json, but these directories in it do: model-0, model-1"), "{two}");
        add_checkpoints(2..8);
        let eight = Checkpoint::open(empty.path()).unwrap_err().to_string();
        assert!(
            eight.ends_with("in it do: model-0, model-1, model-2, model-3, model-4, model-5, model-6, model-7"),
            "{eight}"
        );
        let file = empty.path().join("model-0/model.safetensors");
        std::fs::write(&file, b"").unwrap();
        let error = Checkpoint::open(&file).unwrap_err().to_string();
        assert!(
            error.ends_with("it is a file: pass the directory that holds config.json and the *.safetensors files"),
            "{error}"
        );
        add_checkpoints(8..10);
        let many = Checkpoint::open(empty.path()).unwrap_err().to_string();
        assert!(
            many.ends_with(
                "but 10 directories in it do: model-0, model-1, model-2, model-3, model-4, model-5, model-6, model-7, …"
            ),
            "{many}"
        );
    }
}
