//! `config.json` to [`ModelSpec`], family by family, with the semantics of transformers' own
//! configuration classes (their defaults where a field is absent, their rule for which layers are
//! MoE layers).

use serde_json::{Map, Value};

use crate::capacity::CapacityPolicy;
use crate::family::Family;
use crate::router_spec::{GroupScore, RouterSpec, Scoring};
use crate::spec::{Activation, ModelSpec};

/// A `config.json`, read field by field; every error names the field.
pub(crate) struct HfConfig {
    fields: Map<String, Value>,
}

impl HfConfig {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        match serde_json::from_str(text).map_err(|error| crate::safetensors::json_error(&error))? {
            Value::Object(fields) => Ok(Self { fields }),
            _ => Err("expected a JSON object".to_owned()),
        }
    }

    fn present(&self, field: &str) -> Option<&Value> {
        self.fields.get(field).filter(|value| !value.is_null())
    }

    fn optional_u32(&self, field: &str) -> Result<Option<u32>, String> {
        self.present(field)
            .map(|value| {
                value
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| format!("{field} is {value}, expected a count"))
            })
            .transpose()
    }

    fn u32(&self, field: &str) -> Result<u32, String> {
        self.optional_u32(field)?.ok_or_else(|| format!("{field} is missing"))
    }

    /// The first of `fields` present: transformers saves some under an attribute-map alias.
    fn u32_of(&self, fields: &[&str]) -> Result<u32, String> {
        for field in fields {
            if let Some(value) = self.optional_u32(field)? {
                return Ok(value);
            }
        }
        Err(format!("{} is missing", fields.join(" / ")))
    }

    fn u32_or(&self, field: &str, default: u32) -> Result<u32, String> {
        Ok(self.optional_u32(field)?.unwrap_or(default))
    }

    fn f32_or(&self, field: &str, default: f32) -> Result<f32, String> {
        match self.present(field) {
            None => Ok(default),
            Some(value) => {
                value.as_f64().map(|n| n as f32).ok_or_else(|| format!("{field} is {value}, expected a number"))
            }
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool, String> {
        match self.present(field) {
            None => Ok(default),
            Some(value) => value.as_bool().ok_or_else(|| format!("{field} is {value}, expected true or false")),
        }
    }

    fn str_or<'a>(&'a self, field: &str, default: &'a str) -> Result<&'a str, String> {
        match self.present(field) {
            None => Ok(default),
            Some(value) => value.as_str().ok_or_else(|| format!("{field} is {value}, expected a string")),
        }
    }

    fn u32_list(&self, field: &str) -> Result<Vec<u32>, String> {
        let Some(value) = self.present(field) else {
            return Ok(Vec::new());
        };
        let list = value.as_array().ok_or_else(|| format!("{field} is {value}, expected a list"))?;
        list.iter()
            .map(|item| {
                item.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| format!("{field} holds {item}"))
            })
            .collect()
    }

    pub(crate) fn family(&self) -> Result<Family, String> {
        let model_type = self.str_or("model_type", "")?;
        Family::from_model_type(model_type).ok_or_else(|| {
            let known: Vec<&str> = Family::CHECKPOINT_FAMILIES.iter().map(|family| family.model_type()).collect();
            format!("model_type {model_type:?} is not served; the MoE families are {}", known.join(", "))
        })
    }

    /// True when the experts are MXFP4-quantized (GPT-OSS's published checkpoints); any other
    /// quantization is refused by name.
    pub(crate) fn mxfp4_experts(&self, family: Family) -> Result<bool, String> {
        let Some(quantization) = self.present("quantization_config") else {
            return Ok(false);
        };
        let method = quantization.get("quant_method").and_then(Value::as_str).unwrap_or("unnamed");
        match (method, family) {
            ("mxfp4", Family::GptOss) => Ok(true),
            _ => Err(format!(
                "quantization_config.quant_method {method}: {family} checkpoints are served unquantized{}",
                if family == Family::GptOss { " or in mxfp4" } else { "" }
            )),
        }
    }

    fn require_silu(&self, family: Family) -> Result<(), String> {
        match self.str_or("hidden_act", "silu")? {
            "silu" => Ok(()),
            other => Err(format!("hidden_act {other}: {family} experts are served with silu (SwiGLU) only")),
        }
    }

    /// The spec of this checkpoint (numbered MoE layers, router, expert form, default capacity).
    pub(crate) fn spec(&self, family: Family, name: String, checkpoint: String) -> Result<ModelSpec, String> {
        let base = ModelSpec {
            name,
            family,
            checkpoint: Some(checkpoint),
            capacity: family.default_capacity(None),
            ..ModelSpec::default_synthetic()
        };
        let spec = match family {
            Family::Synthetic => return Err("a checkpoint cannot be synthetic".to_owned()),
            Family::Mixtral | Family::GraniteMoe => {
                self.require_silu(family)?;
                ModelSpec {
                    moe_layers: (0..self.u32("num_hidden_layers")?).collect(),
                    experts_per_layer: self.u32("num_local_experts")?,
                    d_model: self.u32("hidden_size")?,
                    d_ff: self.u32("intermediate_size")?,
                    top_k: self.u32("num_experts_per_tok")?,
                    // Mixtral renormalises its top-k softmax; Granite's softmax over the top-k logits is the same.
                    router: RouterSpec::softmax_top_k(true),
                    ..base
                }
            }
            Family::Qwen2Moe | Family::Qwen3Moe => {
                self.require_silu(family)?;
                let shared_d_ff =
                    if family == Family::Qwen2Moe { self.u32_or("shared_expert_intermediate_size", 0)? } else { 0 };
                ModelSpec {
                    moe_layers: self.qwen_moe_layers()?,
                    experts_per_layer: self.u32_of(&["num_experts", "num_local_experts"])?,
                    d_model: self.u32("hidden_size")?,
                    d_ff: self.u32("moe_intermediate_size")?,
                    top_k: self.u32("num_experts_per_tok")?,
                    router: RouterSpec::softmax_top_k(self.bool_or("norm_topk_prob", false)?),
                    shared_experts: u32::from(shared_d_ff > 0),
                    shared_d_ff,
                    shared_expert_gate: shared_d_ff > 0,
                    ..base
                }
            }
            Family::Olmoe => {
                self.require_silu(family)?;
                ModelSpec {
                    moe_layers: (0..self.u32("num_hidden_layers")?).collect(),
                    experts_per_layer: self.u32_of(&["num_experts", "num_local_experts"])?,
                    d_model: self.u32("hidden_size")?,
                    d_ff: self.u32("intermediate_size")?,
                    top_k: self.u32("num_experts_per_tok")?,
                    router: RouterSpec::softmax_top_k(self.bool_or("norm_topk_prob", false)?),
                    ..base
                }
            }
            Family::DeepseekV2 | Family::DeepseekV3 => self.deepseek(family, base)?,
            Family::GptOss => ModelSpec {
                moe_layers: (0..self.u32("num_hidden_layers")?).collect(),
                experts_per_layer: self.u32_of(&["num_local_experts", "num_experts"])?,
                d_model: self.u32("hidden_size")?,
                d_ff: self.u32("intermediate_size")?,
                top_k: self.u32("num_experts_per_tok")?,
                activation: Activation::ClampedSwiGlu {
                    alpha: self.f32_or("swiglu_alpha", 1.702)?,
                    limit: self.f32_or("swiglu_limit", 7.0)?,
                },
                expert_bias: true,
                // A softmax over the top-k biased logits: the renormalised top-k of the softmax.
                router: RouterSpec { logit_bias: true, ..RouterSpec::softmax_top_k(true) },
                ..base
            },
            Family::SwitchTransformers => self.switch_transformers(base)?,
        };
        Ok(spec)
    }

    /// Qwen2-MoE and Qwen3-MoE: layer `l` is sparse unless listed in `mlp_only_layers`, and only
    /// every `decoder_sparse_step`-th layer is (`(l + 1) % step == 0`).
    fn qwen_moe_layers(&self) -> Result<Vec<u32>, String> {
        let step = self.u32_or("decoder_sparse_step", 1)?;
        if step == 0 {
            return Err("decoder_sparse_step is 0".to_owned());
        }
        let dense = self.u32_list("mlp_only_layers")?;
        let layers = self.u32("num_hidden_layers")?;
        Ok((0..layers).filter(|layer| !dense.contains(layer) && (layer + 1).is_multiple_of(step)).collect())
    }

    /// DeepSeek-V2 and V3: the first `first_k_dense_replace` layers are dense; the shared experts are
    /// one MLP of `n_shared_experts * moe_intermediate_size`, ungated.
    fn deepseek(&self, family: Family, base: ModelSpec) -> Result<ModelSpec, String> {
        self.require_silu(family)?;
        let v3 = family == Family::DeepseekV3;
        if self.bool_or("mlp_bias", false)? {
            return Err("mlp_bias true: DeepSeek experts are served without biases".to_owned());
        }
        let first_moe = self.u32_or("first_k_dense_replace", if v3 { 3 } else { 0 })?;
        let d_ff = self.u32("moe_intermediate_size")?;
        let shared = self.u32_or("n_shared_experts", if v3 { 1 } else { 2 })?;
        let scaling = self.f32_or("routed_scaling_factor", if v3 { 2.5 } else { 1.0 })?;
        let router = if v3 {
            RouterSpec {
                scoring: Scoring::Sigmoid,
                renormalize: self.bool_or("norm_topk_prob", true)?,
                groups: self.u32_or("n_group", 8)?,
                top_groups: self.u32_or("topk_group", 4)?,
                group_score: GroupScore::TopTwoSum,
                scaling,
                logit_bias: false,
                correction_bias: true,
            }
        } else {
            // transformers' DeepSeek-V2 router never renormalises (norm_topk_prob is not read).
            let (groups, top_groups) = match self.str_or("topk_method", "greedy")? {
                "greedy" => (1, 1),
                "group_limited_greedy" => (self.u32("n_group")?, self.u32("topk_group")?),
                other => return Err(format!("topk_method {other}: expected greedy or group_limited_greedy")),
            };
            RouterSpec { groups, top_groups, group_score: GroupScore::Max, scaling, ..RouterSpec::softmax_top_k(false) }
        };
        Ok(ModelSpec {
            moe_layers: (first_moe..self.u32("num_hidden_layers")?).collect(),
            experts_per_layer: self.u32("n_routed_experts")?,
            d_model: self.u32("hidden_size")?,
            d_ff,
            top_k: self.u32("num_experts_per_tok")?,
            router,
            shared_experts: u32::from(shared > 0),
            shared_d_ff: shared * d_ff,
            ..base
        })
    }

    /// Switch Transformers: the sparse encoder blocks (`i % encoder_sparse_step == 1`, or every
    /// block with a step of 1), top-1 with the winner's softmax probability as weight, ReLU or GELU
    /// experts, and `expert_capacity` tokens per expert and sequence.
    fn switch_transformers(&self, base: ModelSpec) -> Result<ModelSpec, String> {
        let blocks = self.u32("num_layers")?;
        let step = match self.optional_u32("encoder_sparse_step")? {
            Some(step) => step,
            None => match self.u32_or("num_sparse_encoder_layers", 3)? {
                0 => blocks,
                sparse => blocks / sparse,
            },
        };
        let moe_layers =
            if step == 0 { Vec::new() } else { (0..blocks).filter(|block| step == 1 || block % step == 1).collect() };
        let activation = match self.str_or("dense_act_fn", "relu")? {
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(format!("dense_act_fn {other}: Switch Transformers experts are served with relu or gelu"));
            }
        };
        Ok(ModelSpec {
            moe_layers,
            experts_per_layer: self.u32("num_experts")?,
            d_model: self.u32("d_model")?,
            d_ff: self.u32("d_ff")?,
            top_k: 1,
            activation,
            router: RouterSpec { logit_bias: self.bool_or("router_bias", false)?, ..RouterSpec::softmax_top_k(false) },
            capacity: CapacityPolicy::PerSequence(self.u32_or("expert_capacity", 64)?),
            ..base
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_of(json: &str) -> Result<ModelSpec, String> {
        let config = HfConfig::parse(json)?;
        let family = config.family()?;
        config.spec(family, "test".into(), "/ckpt".into())?.validate().map_err(|error| error.to_string())
    }

    /// Each family's spec, every field from its own key: sizes that differ from each other and from
    /// the synthetic defaults, so a field left at its default or read from another key shows.
    #[test]
    fn every_family_reads_each_field_from_its_own_key() {
        let sizes = r#""hidden_size": 24, "num_experts_per_tok": 3"#;
        let base = |family: Family, moe_layers: Vec<u32>| ModelSpec {
            name: "test".into(),
            family,
            checkpoint: Some("/ckpt".into()),
            capacity: CapacityPolicy::Dropless,
            moe_layers,
            experts_per_layer: 12,
            d_model: 24,
            d_ff: 20,
            top_k: 3,
            ..ModelSpec::default_synthetic()
        };
        let cases = [
            (
                format!(
                    r#"{{"model_type": "mixtral", {sizes}, "num_hidden_layers": 2, "num_local_experts": 12, "intermediate_size": 20}}"#
                ),
                base(Family::Mixtral, vec![0, 1]),
            ),
            (
                format!(
                    r#"{{"model_type": "granitemoe", {sizes}, "num_hidden_layers": 2, "num_local_experts": 12, "intermediate_size": 20}}"#
                ),
                base(Family::GraniteMoe, vec![0, 1]),
            ),
            (
                format!(
                    r#"{{"model_type": "qwen2_moe", {sizes}, "num_hidden_layers": 2, "num_experts": 12, "moe_intermediate_size": 20, "intermediate_size": 99, "shared_expert_intermediate_size": 36}}"#
                ),
                ModelSpec {
                    router: RouterSpec::softmax_top_k(false),
                    shared_experts: 1,
                    shared_d_ff: 36,
                    shared_expert_gate: true,
                    ..base(Family::Qwen2Moe, vec![0, 1])
                },
            ),
            (
                format!(
                    r#"{{"model_type": "qwen3_moe", {sizes}, "num_hidden_layers": 2, "num_local_experts": 12, "moe_intermediate_size": 20, "intermediate_size": 99, "norm_topk_prob": true}}"#
                ),
                base(Family::Qwen3Moe, vec![0, 1]),
            ),
            (
                format!(
                    r#"{{"model_type": "olmoe", {sizes}, "num_hidden_layers": 2, "num_experts": 12, "intermediate_size": 20}}"#
                ),
                ModelSpec { router: RouterSpec::softmax_top_k(false), ..base(Family::Olmoe, vec![0, 1]) },
            ),
            (
                format!(
                    r#"{{"model_type": "deepseek_v2", {sizes}, "num_hidden_layers": 3, "n_routed_experts": 12, "moe_intermediate_size": 20, "intermediate_size": 99, "first_k_dense_replace": 1, "n_shared_experts": 2, "routed_scaling_factor": 1.5, "topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 2}}"#
                ),
                ModelSpec {
                    router: RouterSpec {
                        groups: 3,
                        top_groups: 2,
                        group_score: GroupScore::Max,
                        scaling: 1.5,
                        ..RouterSpec::softmax_top_k(false)
                    },
                    shared_experts: 1,
                    shared_d_ff: 40,
                    ..base(Family::DeepseekV2, vec![1, 2])
                },
            ),
            (
                format!(
                    r#"{{"model_type": "deepseek_v3", {sizes}, "num_hidden_layers": 3, "n_routed_experts": 12, "moe_intermediate_size": 20, "intermediate_size": 99, "first_k_dense_replace": 2, "n_shared_experts": 0, "routed_scaling_factor": 1.5, "n_group": 4, "topk_group": 2, "norm_topk_prob": false}}"#
                ),
                ModelSpec {
                    router: RouterSpec {
                        scoring: Scoring::Sigmoid,
                        renormalize: false,
                        groups: 4,
                        top_groups: 2,
                        group_score: GroupScore::TopTwoSum,
                        scaling: 1.5,
                        logit_bias: false,
                        correction_bias: true,
                    },
                    ..base(Family::DeepseekV3, vec![2])
                },
            ),
            (
                format!(
                    r#"{{"model_type": "gpt_oss", {sizes}, "num_hidden_layers": 2, "num_local_experts": 12, "intermediate_size": 20, "swiglu_alpha": 1.5, "swiglu_limit": 5.0}}"#
                ),
                ModelSpec {
                    activation: Activation::ClampedSwiGlu { alpha: 1.5, limit: 5.0 },
                    expert_bias: true,
                    router: RouterSpec { logit_bias: true, ..RouterSpec::softmax_top_k(true) },
                    ..base(Family::GptOss, vec![0, 1])
                },
            ),
            (
                r#"{"model_type": "switch_transformers", "d_model": 24, "d_ff": 20, "num_layers": 4, "num_experts": 12,
                    "encoder_sparse_step": 2, "dense_act_fn": "gelu", "router_bias": true, "expert_capacity": 7}"#
                    .to_owned(),
                ModelSpec {
                    top_k: 1,
                    activation: Activation::Gelu,
                    router: RouterSpec { logit_bias: true, ..RouterSpec::softmax_top_k(false) },
                    capacity: CapacityPolicy::PerSequence(7),
                    ..base(Family::SwitchTransformers, vec![1, 3])
                },
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(spec_of(&json), Ok(expected), "{json}");
        }
    }

    #[test]
    fn qwen_layers_follow_the_sparse_step_and_the_dense_list() {
        let spec = spec_of(
            r#"{"model_type": "qwen2_moe", "hidden_size": 8, "num_hidden_layers": 6, "num_experts": 4,
                "num_experts_per_tok": 2, "moe_intermediate_size": 16, "decoder_sparse_step": 2,
                "mlp_only_layers": [3]}"#,
        )
        .unwrap();
        assert_eq!(spec.moe_layers, [1, 5], "(l + 1) % 2 == 0 except layer 3");
        assert_eq!(spec.capacity, CapacityPolicy::Dropless);
    }

    #[test]
    fn deepseek_v3_defaults_are_transformers_defaults() {
        let spec = spec_of(
            r#"{"model_type": "deepseek_v3", "hidden_size": 8, "num_hidden_layers": 5, "n_routed_experts": 16,
                "num_experts_per_tok": 2, "moe_intermediate_size": 4}"#,
        )
        .unwrap();
        assert_eq!(spec.moe_layers, [3, 4], "first_k_dense_replace defaults to 3");
        assert_eq!((spec.router.groups, spec.router.top_groups, spec.router.scaling), (8, 4, 2.5));
        assert!(spec.router.correction_bias && spec.router.renormalize && spec.router.scoring == Scoring::Sigmoid);
        assert_eq!((spec.shared_experts, spec.shared_d_ff, spec.shared_expert_gate), (1, 4, false));
    }

    #[test]
    fn switch_blocks_capacity_and_activation() {
        let spec = spec_of(
            r#"{"model_type": "switch_transformers", "d_model": 8, "d_ff": 16, "num_layers": 12, "num_experts": 8,
                "num_sparse_encoder_layers": 6, "expert_capacity": 64}"#,
        )
        .unwrap();
        assert_eq!(spec.moe_layers, [1, 3, 5, 7, 9, 11], "switch-base-8's sparse encoder blocks");
        assert_eq!(
            (spec.top_k, spec.activation, spec.capacity),
            (1, Activation::Relu, CapacityPolicy::PerSequence(64))
        );
        assert!(!spec.router.renormalize);
    }

    #[test]
    fn only_gpt_oss_mxfp4_quantization_is_read() {
        let gpt_oss =
            HfConfig::parse(r#"{"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}"#).unwrap();
        assert_eq!(gpt_oss.mxfp4_experts(Family::GptOss), Ok(true));
        let awq =
            HfConfig::parse(r#"{"model_type": "mixtral", "quantization_config": {"quant_method": "awq"}}"#).unwrap();
        assert_eq!(
            awq.mxfp4_experts(Family::Mixtral).unwrap_err(),
            "quantization_config.quant_method awq: Mixtral checkpoints are served unquantized"
        );
        assert_eq!(HfConfig::parse(r#"{"model_type": "mixtral"}"#).unwrap().mxfp4_experts(Family::Mixtral), Ok(false));
    }

    #[test]
    fn errors_name_the_field() {
        let error = spec_of(r#"{"model_type": "mixtral", "hidden_size": 8}"#).unwrap_err();
        assert_eq!(error, "num_hidden_layers is missing");
        let error = spec_of(r#"{"model_type": "llama"}"#).unwrap_err();
        assert!(error.contains("\"llama\" is not served") && error.contains("deepseek_v3"), "{error}");
        let error = spec_of(
            r#"{"model_type": "olmoe", "hidden_size": 8, "num_hidden_layers": 1, "num_experts": -4,
                "num_experts_per_tok": 1, "intermediate_size": 4}"#,
        )
        .unwrap_err();
        assert_eq!(error, "num_experts is -4, expected a count");
        let error = spec_of(
            r#"{"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 1, "num_local_experts": 4,
                "num_experts_per_tok": 1, "intermediate_size": 4, "hidden_act": "gelu"}"#,
        )
        .unwrap_err();
        assert!(error.starts_with("hidden_act gelu"), "{error}");
    }
}
