//! DeepSeek-V3's router (as Hugging Face transformers' `DeepseekV3TopkRouter` computes it):
//!
//! 1. `scores = sigmoid(logits)`;
//! 2. `choice = scores + bias` (the score-correction bias steers *selection* only);
//! 3. each group of `experts / groups` experts scores the sum of its two best `choice` values;
//!    the `top_groups` best groups stay, the other experts' `choice` is set to 0;
//! 4. the top-k experts by `choice`; their weights are the *unbiased* `scores`, divided by their
//!    sum when `renormalize` (`norm_topk_prob`), then multiplied by `scaling`
//!    (`routed_scaling_factor`).

use super::{Routing, ranked};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupLimited {
    pub k: usize,
    pub groups: usize,
    pub top_groups: usize,
    pub renormalize: bool,
    pub scaling: f32,
}

impl GroupLimited {
    /// Routes `logits` (`[tokens, experts]`) with `bias` (`[experts]`, zeros when absent).
    pub fn route(self, logits: &[f32], experts: usize, bias: &[f32]) -> Routing {
        let tokens = logits.len() / experts;
        let per_group = experts / self.groups;
        let mut probabilities = Vec::with_capacity(logits.len());
        let mut choices = Vec::with_capacity(tokens * self.k);
        let mut choice = vec![0.0f32; experts];
        let mut group_scores = vec![0.0f32; self.groups];
        let mut order = Vec::with_capacity(experts);
        let mut group_order = Vec::with_capacity(self.groups);
        for row in logits.chunks_exact(experts) {
            let start = probabilities.len();
            probabilities.extend(row.iter().map(|logit| 1.0 / (1.0 + (-logit).exp())));
            let scores = &probabilities[start..];
            for (expert, value) in choice.iter_mut().enumerate() {
                *value = scores[expert] + bias.get(expert).copied().unwrap_or(0.0);
            }
            for (group, score) in group_scores.iter_mut().enumerate() {
                let members = &choice[group * per_group..(group + 1) * per_group];
                let (mut best, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for value in members {
                    if *value > best {
                        second = best;
                        best = *value;
                    } else if *value > second {
                        second = *value;
                    }
                }
                *score = if per_group > 1 { best + second } else { best };
            }
            ranked(&group_scores, &mut group_order);
            for group in &group_order[self.top_groups..] {
                let group = *group as usize;
                choice[group * per_group..(group + 1) * per_group].fill(0.0);
            }
            ranked(&choice, &mut order);
            let kept = &order[..self.k];
            let total: f32 =
                if self.renormalize { kept.iter().map(|e| scores[*e as usize]).sum::<f32>() + 1e-20 } else { 1.0 };
            choices.extend(kept.iter().map(|e| (*e, scores[*e as usize] / total * self.scaling)));
        }
        Routing { tokens, experts, top_k: self.k, choices, probabilities }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sigmoid(x: f32) -> f32 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn the_bias_steers_selection_but_not_the_weights() {
        let policy = GroupLimited { k: 1, groups: 1, top_groups: 1, renormalize: false, scaling: 2.5 };
        let logits = [1.0f32, 0.5];
        let plain = policy.route(&logits, 2, &[0.0, 0.0]);
        assert_eq!(plain.choices[0].0, 0);
        let biased = policy.route(&logits, 2, &[0.0, 0.5]);
        assert_eq!(biased.choices[0].0, 1, "the bias makes expert 1 win the selection");
        assert!((biased.choices[0].1 - sigmoid(0.5) * 2.5).abs() < 1e-6, "its weight is its unbiased score, scaled");
    }

    #[test]
    fn only_experts_of_the_top_groups_are_chosen() {
        // 4 experts in 2 groups; group 0 = {0, 1} has the single best expert, group 1 = {2, 3} the best pair.
        let policy = GroupLimited { k: 2, groups: 2, top_groups: 1, renormalize: true, scaling: 1.0 };
        let logits = [3.0f32, -3.0, 1.5, 1.5];
        let routing = policy.route(&logits, 4, &[0.0; 4]);
        let chosen: Vec<u32> = routing.choices.iter().map(|(expert, _)| *expert).collect();
        assert_eq!(chosen, [2, 3], "group 1 scores 2*sigmoid(1.5) > sigmoid(3) + sigmoid(-3)");
        let sum: f32 = routing.choices.iter().map(|(_, weight)| weight).sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }
}
