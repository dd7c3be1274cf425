//! The published architectures whose MoE blocks Switchyard reproduces.

use switchyard_proto::v1;

use crate::capacity::CapacityPolicy;

/// Which architecture a model follows: it decides the checkpoint's tensor names, the router, the
/// expert form and the default capacity policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Seeded synthetic weights.
    Synthetic,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    DeepseekV2,
    DeepseekV3,
    GptOss,
    GraniteMoe,
    SwitchTransformers,
}

impl Family {
    /// The name transformers gives the architecture (`model_type` in config.json).
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Synthetic => "synthetic",
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Olmoe => "olmoe",
            Family::DeepseekV2 => "deepseek_v2",
            Family::DeepseekV3 => "deepseek_v3",
            Family::GptOss => "gpt_oss",
            Family::GraniteMoe => "granitemoe",
            Family::SwitchTransformers => "switch_transformers",
        }
    }

    /// Every family a checkpoint may declare, for error messages.
    pub const CHECKPOINT_FAMILIES: [Family; 9] = [
        Family::Mixtral,
        Family::Qwen2Moe,
        Family::Qwen3Moe,
        Family::Olmoe,
        Family::DeepseekV2,
        Family::DeepseekV3,
        Family::GptOss,
        Family::GraniteMoe,
        Family::SwitchTransformers,
    ];

    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::CHECKPOINT_FAMILIES.into_iter().find(|family| family.model_type() == model_type)
    }

    /// The capacity policy of the family's reference implementation at inference. Every family but
    /// Switch Transformers runs each token through all its chosen experts; Switch Transformers applies
    /// its configured `expert_capacity` per sequence. Synthetic models keep GShard's capacity factor.
    pub fn default_capacity(self, expert_capacity: Option<u32>) -> CapacityPolicy {
        match (self, expert_capacity) {
            (Family::Synthetic, _) => CapacityPolicy::Factor(crate::DEFAULT_CAPACITY_FACTOR),
            (Family::SwitchTransformers, Some(capacity)) => CapacityPolicy::PerSequence(capacity),
            _ => CapacityPolicy::Dropless,
        }
    }

    pub(crate) fn to_proto(self) -> v1::ModelFamily {
        match self {
            Family::Synthetic => v1::ModelFamily::Synthetic,
            Family::Mixtral => v1::ModelFamily::Mixtral,
            Family::Qwen2Moe => v1::ModelFamily::Qwen2Moe,
            Family::Qwen3Moe => v1::ModelFamily::Qwen3Moe,
            Family::Olmoe => v1::ModelFamily::Olmoe,
            Family::DeepseekV2 => v1::ModelFamily::DeepseekV2,
            Family::DeepseekV3 => v1::ModelFamily::DeepseekV3,
            Family::GptOss => v1::ModelFamily::GptOss,
            Family::GraniteMoe => v1::ModelFamily::GraniteMoe,
            Family::SwitchTransformers => v1::ModelFamily::SwitchTransformers,
        }
    }

    pub(crate) fn from_proto(value: i32) -> Option<Self> {
        Some(match v1::ModelFamily::try_from(value).ok()? {
            v1::ModelFamily::Unspecified => return None,
            v1::ModelFamily::Synthetic => Family::Synthetic,
            v1::ModelFamily::Mixtral => Family::Mixtral,
            v1::ModelFamily::Qwen2Moe => Family::Qwen2Moe,
            v1::ModelFamily::Qwen3Moe => Family::Qwen3Moe,
            v1::ModelFamily::Olmoe => Family::Olmoe,
            v1::ModelFamily::DeepseekV2 => Family::DeepseekV2,
            v1::ModelFamily::DeepseekV3 => Family::DeepseekV3,
            v1::ModelFamily::GptOss => Family::GptOss,
            v1::ModelFamily::GraniteMoe => Family::GraniteMoe,
            v1::ModelFamily::SwitchTransformers => Family::SwitchTransformers,
        })
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Synthetic => "synthetic",
            Family::Mixtral => "Mixtral",
            Family::Qwen2Moe => "Qwen2-MoE",
            Family::Qwen3Moe => "Qwen3-MoE",
            Family::Olmoe => "OLMoE",
            Family::DeepseekV2 => "DeepSeek-V2",
            Family::DeepseekV3 => "DeepSeek-V3",
            Family::GptOss => "GPT-OSS",
            Family::GraniteMoe => "Granite-MoE",
            Family::SwitchTransformers => "Switch Transformers",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_types_round_trip_and_wire_values_too() {
        for family in Family::CHECKPOINT_FAMILIES {
            assert_eq!(Family::from_model_type(family.model_type()), Some(family));
            assert_eq!(Family::from_proto(family.to_proto() as i32), Some(family));
        }
        assert_eq!(Family::from_model_type("llama"), None);
        assert_eq!(Family::from_proto(0), None);
    }

    #[test]
    fn only_switch_transformers_and_synthetic_models_have_a_capacity_by_default() {
        assert_eq!(Family::Mixtral.default_capacity(None), CapacityPolicy::Dropless);
        assert_eq!(Family::DeepseekV3.default_capacity(None), CapacityPolicy::Dropless);
        assert_eq!(Family::SwitchTransformers.default_capacity(Some(64)), CapacityPolicy::PerSequence(64));
        assert_eq!(Family::Synthetic.default_capacity(None), CapacityPolicy::Factor(1.25));
    }
}
