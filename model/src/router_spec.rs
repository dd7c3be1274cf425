//! What a model's router computes: logits `x · W_gᵀ` (plus a learned bias in some families), scores
//! (softmax or sigmoid), a selection (top-k, optionally limited to the best groups of experts), and
//! the weights of the chosen experts (renormalised or not, scaled or not).

use switchyard_proto::v1;

/// How logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over all experts.
    Softmax,
    /// Element-wise sigmoid (DeepSeek-V3).
    Sigmoid,
}

/// How a group of experts is scored by group-limited selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    /// The sum of the group's two best scores (DeepSeek-V3).
    TopTwoSum,
    /// The group's best score (DeepSeek-V2's `group_limited_greedy`).
    Max,
}

/// The router of every MoE layer of a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterSpec {
    pub scoring: Scoring,
    /// Divide the k chosen weights by their sum (Mixtral; `norm_topk_prob` elsewhere).
    pub renormalize: bool,
    /// Experts form `groups` equal groups; only the `top_groups` best may be chosen. 1: no groups.
    pub groups: u32,
    pub top_groups: u32,
    pub group_score: GroupScore,
    /// Multiplies the routed weights (DeepSeek's `routed_scaling_factor`).
    pub scaling: f32,
    /// The router's linear layer has a bias (GPT-OSS; Switch Transformers with `router_bias`).
    pub logit_bias: bool,
    /// DeepSeek-V3's `e_score_correction_bias`: added to the scores for selection only.
    pub correction_bias: bool,
}

impl RouterSpec {
    /// Softmax over the experts, top-k, with or without renormalisation: Mixtral, Qwen, OLMoE.
    pub fn softmax_top_k(renormalize: bool) -> Self {
        Self {
            scoring: Scoring::Softmax,
            renormalize,
            groups: 1,
            top_groups: 1,
            group_score: GroupScore::TopTwoSum,
            scaling: 1.0,
            logit_bias: false,
            correction_bias: false,
        }
    }

    /// True when the plain softmax top-k policy computes this router: no sigmoid, groups or scaling.
    pub fn is_softmax_top_k(&self) -> bool {
        self.scoring == Scoring::Softmax && self.groups <= 1 && self.scaling == 1.0
    }

    pub fn describe(&self, top_k: u32) -> String {
        let scores = match self.scoring {
            Scoring::Softmax => "softmax",
            Scoring::Sigmoid => "sigmoid",
        };
        let mut text = format!("{scores} scores, top-{top_k}");
        if self.groups > 1 {
            let group_score = match self.group_score {
                GroupScore::TopTwoSum => "sum of its two best scores",
                GroupScore::Max => "its best score",
            };
            text += &format!(
                " within the best {} of {} expert groups (a group scores {group_score})",
                self.top_groups, self.groups
            );
        }
        text += if self.renormalize { ", weights renormalised" } else { ", weights as scored" };
        if self.scaling != 1.0 {
            text += &format!(", scaled by {}", self.scaling);
        }
        if self.logit_bias {
            text += ", logit bias";
        }
        if self.correction_bias {
            text += ", score-correction bias for selection";
        }
        text
    }

    pub(crate) fn to_proto(self) -> v1::RouterSpec {
        v1::RouterSpec {
            scoring: match self.scoring {
                Scoring::Softmax => v1::RouterScoring::Softmax,
                Scoring::Sigmoid => v1::RouterScoring::Sigmoid,
            } as i32,
            groups: self.groups,
            top_groups: self.top_groups,
            group_score: match self.group_score {
                GroupScore::TopTwoSum => v1::GroupScore::TopTwoSum,
                GroupScore::Max => v1::GroupScore::Max,
            } as i32,
            scaling: self.scaling,
            logit_bias: self.logit_bias,
            correction_bias: self.correction_bias,
        }
    }

    /// The router of `wire`; `renormalize` travels in the model spec. Unknown enum values fall back
    /// to the proto3 defaults' meaning only when they are the default (0); others are refused by the caller.
    pub(crate) fn from_proto(wire: Option<v1::RouterSpec>, renormalize: bool) -> Result<Self, i32> {
        let wire = wire.unwrap_or_default();
        let scoring = match v1::RouterScoring::try_from(wire.scoring) {
            Ok(v1::RouterScoring::Softmax) => Scoring::Softmax,
            Ok(v1::RouterScoring::Sigmoid) => Scoring::Sigmoid,
            Err(_) => return Err(wire.scoring),
        };
        let group_score = match v1::GroupScore::try_from(wire.group_score) {
            Ok(v1::GroupScore::TopTwoSum) => GroupScore::TopTwoSum,
            Ok(v1::GroupScore::Max) => GroupScore::Max,
            Err(_) => return Err(wire.group_score),
        };
        Ok(Self {
            scoring,
            renormalize,
            groups: wire.groups.max(1),
            top_groups: wire.top_groups.max(1),
            group_score,
            scaling: if wire.scaling == 0.0 { 1.0 } else { wire.scaling },
            logit_bias: wire.logit_bias,
            correction_bias: wire.correction_bias,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_names_only_what_the_router_does() {
        assert_eq!(RouterSpec::softmax_top_k(true).describe(2), "softmax scores, top-2, weights renormalised");
        let grouped = RouterSpec {
            scoring: Scoring::Sigmoid,
            groups: 8,
            top_groups: 4,
            scaling: 2.5,
            correction_bias: true,
            ..RouterSpec::softmax_top_k(true)
        };
        assert_eq!(
            grouped.describe(8),
            "sigmoid scores, top-8 within the best 4 of 8 expert groups (a group scores sum of its two best \
             scores), weights renormalised, scaled by 2.5, score-correction bias for selection"
        );
        let biased = RouterSpec { logit_bias: true, ..RouterSpec::softmax_top_k(false) };
        assert_eq!(biased.describe(4), "softmax scores, top-4, weights as scored, logit bias");
    }

    #[test]
    fn only_an_ungrouped_unscaled_softmax_is_plain_top_k() {
        let plain = RouterSpec::softmax_top_k(false);
        let routers = [
            plain,
            RouterSpec { renormalize: true, logit_bias: true, ..plain },
            RouterSpec { scoring: Scoring::Sigmoid, ..plain },
            RouterSpec { groups: 2, ..plain },
            RouterSpec { scaling: 2.5, ..plain },
        ];
        assert_eq!(routers.map(|router| router.is_softmax_top_k()), [true, true, false, false, false]);
    }
}
