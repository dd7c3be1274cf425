//! DeepSeek's routers, as Hugging Face transformers computes them (`DeepseekV3TopkRouter`,
//! `DeepseekV2TopkRouter`):
//!
//! 1. `scores = sigmoid(logits)` (V3) or `softmax(logits)` (V2);
//! 2. `choice = scores + bias` (V3's score-correction bias steers *selection* only);
//! 3. with groups, each group of `experts / groups` experts scores the sum of its two best `choice`
//!    values (V3) or its best one (V2's `group_limited_greedy`); the `top_groups` best groups stay,
//!    the other experts' `choice` is set to −∞;
//! 4. the top-k experts by `choice`; their weights are the *unbiased* `scores`, divided by their
//!    sum when `renormalize` (`norm_topk_prob`), then multiplied by `scaling`
//!    (`routed_scaling_factor`).

use switchyard_model::{GroupScore, Scoring};

use super::{Routing, ranked, sigmoid, softmax_into};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupLimited {
    pub k: usize,
    pub groups: usize,
    pub top_groups: usize,
    pub renormalize: bool,
    pub scaling: f32,
    pub scoring: Scoring,
    pub group_score: GroupScore,
}

impl GroupLimited {
    /// DeepSeek-V3's form: sigmoid scores, groups scored by their two best.
    pub fn deepseek_v3(k: usize, groups: usize, top_groups: usize) -> Self {
        Self {
            k,
            groups,
            top_groups,
            renormalize: true,
            scaling: 1.0,
            scoring: Scoring::Sigmoid,
            group_score: GroupScore::TopTwoSum,
        }
    }

    /// Routes `logits` (`[tokens, experts]`) with `bias` (`[experts]`, zeros when absent).
    pub fn route(self, logits: &[f32], experts: usize, bias: &[f32]) -> Routing {
        let tokens = logits.len() / experts;
        let groups = self.groups.max(1);
        let per_group = experts / groups;
        let mut probabilities = Vec::with_capacity(logits.len());
        let mut choices = Vec::with_capacity(tokens * self.k);
        let mut choice = vec![0.0f32; experts];
        let mut group_scores = vec![0.0f32; groups];
        let mut order = Vec::with_capacity(experts);
        let mut group_order = Vec::with_capacity(groups);
        for row in logits.chunks_exact(experts) {
            let start = probabilities.len();
            match self.scoring {
                Scoring::Sigmoid => probabilities.extend(row.iter().copied().map(sigmoid)),
                Scoring::Softmax => softmax_into(row, &mut probabilities),
            }
            let scores = &probabilities[start..];
            for (expert, value) in choice.iter_mut().enumerate() {
                *value = scores[expert] + bias.get(expert).copied().unwrap_or(0.0);
            }
            if groups > 1 {
                for (group, score) in group_scores.iter_mut().enumerate() {
                    *score = self.score_group(&choice[group * per_group..(group + 1) * per_group]);
                }
                ranked(&group_scores, &mut group_order);
                for group in &group_order[self.top_groups..] {
                    let group = *group as usize;
                    choice[group * per_group..(group + 1) * per_group].fill(f32::NEG_INFINITY);
                }
            }
            ranked(&choice, &mut order);
            let kept = &order[..self.k];
            let total: f32 =
                if self.renormalize { kept.iter().map(|e| scores[*e as usize]).sum::<f32>() + 1e-20 } else { 1.0 };
            choices.extend(kept.iter().map(|e| (*e, scores[*e as usize] / total * self.scaling)));
        }
        Routing { tokens, experts, top_k: self.k, choices, probabilities }
    }

    fn score_group(self, members: &[f32]) -> f32 {
        let (mut best, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        for value in members {
            if *value > best {
                second = best;
                best = *value;
            } else if *value > second {
                second = *value;
            }
        }
        match self.group_score {
            GroupScore::TopTwoSum if members.len() > 1 => best + second,
            _ => best,
        }
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
        let policy = GroupLimited { renormalize: false, scaling: 2.5, ..GroupLimited::deepseek_v3(1, 1, 1) };
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
        let policy = GroupLimited::deepseek_v3(2, 2, 1);
        let logits = [3.0f32, -3.0, 1.5, 1.5];
        let routing = policy.route(&logits, 4, &[0.0; 4]);
        let chosen: Vec<u32> = routing.choices.iter().map(|(expert, _)| *expert).collect();
        assert_eq!(chosen, [2, 3], "group 1 scores 2*sigmoid(1.5) > sigmoid(3) + sigmoid(-3)");
        let sum: f32 = routing.choices.iter().map(|(_, weight)| weight).sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }

    #[test]
    fn each_token_keeps_the_experts_of_its_own_top_group() {
        // 6 experts in 3 groups of 2: token 0's best pair is group 2 {4, 5}, token 1's group 1 {2, 3}.
        let policy = GroupLimited::deepseek_v3(2, 3, 1);
        let logits = [3.0f32, -3.0, 0.0, 0.0, 1.5, 1.5, 0.0, 0.0, 1.5, 1.5, 3.0, -3.0];
        let routing = policy.route(&logits, 6, &[0.0; 6]);
        assert_eq!(routing.tokens, 2);
        let chosen: Vec<u32> = routing.choices.iter().map(|(expert, _)| *expert).collect();
        assert_eq!(chosen, [4, 5, 2, 3]);
    }

    #[test]
    fn a_group_of_one_expert_scores_that_expert() {
        // 4 groups of 1, top-2 groups: the two best experts' groups remain, whatever TopTwoSum says.
        let routing = GroupLimited::deepseek_v3(1, 4, 2).route(&[0.0, 1.0, 3.0, 2.0], 4, &[0.0; 4]);
        assert_eq!(routing.choices[0].0, 2);
    }

    #[test]
    fn experts_outside_the_top_groups_lose_even_to_negative_biased_scores() {
        // A strongly negative bias makes every choice value negative: masking with 0 would let an
        // expert of a dropped group win; −∞ (as transformers masks) keeps the choice in the top group.
        let policy = GroupLimited::deepseek_v3(2, 2, 1);
        let logits = [2.0f32, 1.0, -2.0, -3.0];
        let routing = policy.route(&logits, 4, &[-5.0; 4]);
        let chosen: Vec<u32> = routing.choices.iter().map(|(expert, _)| *expert).collect();
        assert_eq!(chosen, [0, 1]);
    }

    #[test]
    fn deepseek_v2_greedy_is_softmax_top_k_scaled_without_renormalisation() {
        let policy = GroupLimited {
            renormalize: false,
            scaling: 16.0,
            scoring: Scoring::Softmax,
            group_score: GroupScore::Max,
            ..GroupLimited::deepseek_v3(1, 1, 1)
        };
        let logits = [0.0f32, 1.0_f32.ln(), 3.0_f32.ln()];
        let routing = policy.route(&logits, 3, &[]);
        assert_eq!(routing.choices[0].0, 2);
        assert!((routing.choices[0].1 - 16.0 * 3.0 / 5.0).abs() < 1e-5, "{:?}", routing.choices);
    }

    #[test]
    fn deepseek_v2_group_limited_greedy_scores_groups_by_their_best() {
        // Groups {0, 1} and {2, 3}: group 0 holds the best single expert, group 1 the better pair.
        let policy = GroupLimited {
            renormalize: false,
            scoring: Scoring::Softmax,
            group_score: GroupScore::Max,
            ..GroupLimited::deepseek_v3(2, 2, 1)
        };
        let routing = policy.route(&[3.0, -3.0, 2.5, 2.5], 4, &[]);
        let chosen: Vec<u32> = routing.choices.iter().map(|(expert, _)| *expert).collect();
        assert_eq!(chosen, [0, 1], "by its best score group 0 wins; the sum of two would pick group 1");
    }

    #[test]
    fn renormalised_weights_of_vanishing_scores_keep_transformers_1e_20_guard() {
        // Sigmoid scores near 1e-21: transformers divides by `sum + 1e-20`, so the weights stay
        // finite and sum to far less than 1 rather than to 1 (or to a negative number).
        let logits = [-48.0f32, -48.5, -60.0, -70.0];
        let routing = GroupLimited::deepseek_v3(2, 1, 1).route(&logits, 4, &[]);
        let (s0, s1) = (sigmoid(-48.0), sigmoid(-48.5));
        let denominator = s0 + s1 + 1e-20;
        let expected = [(0, s0 / denominator), (1, s1 / denominator)];
        for ((expert, weight), (want_expert, want_weight)) in routing.choices.iter().zip(expected) {
            assert_eq!(*expert, want_expert);
            assert!((weight - want_weight).abs() <= 1e-6 * want_weight, "{:?} against {expected:?}", routing.choices);
        }
        let sum: f32 = routing.choices.iter().map(|(_, weight)| weight).sum();
        assert!(sum > 0.1 && sum < 0.5, "the guard, not the scores, dominates the denominator: {sum}");
    }
}
