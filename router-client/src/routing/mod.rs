//! Routing policies: from gate logits to each token's chosen experts and their weights.
//!
//! Token-choice policies give every token `k` ranked choices ([`Routing`]); capacity then decides
//! which survive ([`crate::capacity`]). Expert choice inverts it: each expert picks its tokens, so
//! nothing overflows.
//!
//! | policy | published form |
//! | --- | --- |
//! | [`RoutingPolicy::TopK`] | softmax over all experts, top-k; renormalised (Mixtral) or not (Qwen2-MoE `norm_topk_prob = false`, GShard) |
//! | [`RoutingPolicy::NoisyTopK`] | Shazeer et al. 2017: `H = x·W_g + N(0,1)·softplus(x·W_noise)`, KeepTopK, softmax over the k kept |
//! | [`RoutingPolicy::Dense`] | every expert, softmax weights |
//! | [`RoutingPolicy::ExpertChoice`] | Zhou et al. 2022: each expert takes its top-C tokens by softmax score |
//! | [`RoutingPolicy::GroupLimited`] | DeepSeek-V3: sigmoid scores, a bias that steers selection only, top groups then top-k |
//! | [`RoutingPolicy::SoftMoe`] | Puigcerver et al. 2023: experts process slots, each a softmax-over-tokens mix of the inputs; outputs mixed back by a softmax over slots |

mod deepseek;
mod noisy;
pub mod soft;
mod softmax_topk;

pub use deepseek::GroupLimited;
pub use noisy::noise;

/// How tokens and experts are matched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RoutingPolicy {
    /// Softmax over all experts, top-k; `renormalize` rescales the k weights to sum to one.
    TopK { k: usize, renormalize: bool },
    /// Noisy top-k gating, seeded: the noise of `(seed, token, expert)` is a pure function of them.
    NoisyTopK { k: usize, seed: u64 },
    /// Every token to every expert, weighted by the softmax.
    Dense,
    /// Each expert picks its `capacity` best tokens by softmax score.
    ExpertChoice,
    /// DeepSeek-V3's group-limited routing.
    GroupLimited(GroupLimited),
    /// Soft MoE with `slots` slots per expert.
    SoftMoe { slots: usize },
}

impl RoutingPolicy {
    pub fn name(self) -> &'static str {
        match self {
            RoutingPolicy::TopK { renormalize: true, .. } => "top-k (renormalised)",
            RoutingPolicy::TopK { renormalize: false, .. } => "top-k (softmax weights)",
            RoutingPolicy::NoisyTopK { .. } => "noisy top-k",
            RoutingPolicy::Dense => "dense",
            RoutingPolicy::ExpertChoice => "expert choice",
            RoutingPolicy::GroupLimited(_) => "group-limited (DeepSeek-V3)",
            RoutingPolicy::SoftMoe { .. } => "soft MoE",
        }
    }
}

/// Each token's choices, best first: `choices[t * top_k + rank] = (expert, weight)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub tokens: usize,
    pub experts: usize,
    pub top_k: usize,
    pub choices: Vec<(u32, f32)>,
    /// Router probabilities `[tokens, experts]` (softmax; sigmoid scores for group-limited), for
    /// statistics and for re-routing overflow to a token's next choice.
    pub probabilities: Vec<f32>,
}

impl Routing {
    pub fn token_choices(&self, token: usize) -> &[(u32, f32)] {
        &self.choices[token * self.top_k..(token + 1) * self.top_k]
    }

    pub fn token_probabilities(&self, token: usize) -> &[f32] {
        &self.probabilities[token * self.experts..(token + 1) * self.experts]
    }
}

/// What the gate computed for one batch.
#[derive(Debug, Clone, Copy)]
pub struct GateScores<'a> {
    /// `x · W_gᵀ`, `[tokens, experts]`.
    pub logits: &'a [f32],
    /// `x · W_noiseᵀ`, for noisy top-k.
    pub noise_logits: Option<&'a [f32]>,
    /// The score-correction bias, for group-limited routing.
    pub bias: Option<&'a [f32]>,
}

/// Applies a token-choice `policy`. Expert choice is not a token choice: it is routed by
/// [`crate::capacity::expert_choice`], and here behaves as top-1 so callers need no special case.
/// Soft MoE is routed by [`soft`] from slot logits; here it behaves as dense.
pub fn route(scores: GateScores<'_>, experts: usize, policy: RoutingPolicy) -> Routing {
    route_on(scores, experts, policy, 1)
}

/// [`route`] with up to `threads` threads for the softmax policies (top-k, dense, expert choice's
/// and Soft MoE's stand-ins), whose tokens are routed each alone; the others route on one.
pub fn route_on(scores: GateScores<'_>, experts: usize, policy: RoutingPolicy, threads: usize) -> Routing {
    let logits = scores.logits;
    match policy {
        RoutingPolicy::TopK { k, renormalize } => softmax_topk::route_on(logits, experts, k, renormalize, threads),
        RoutingPolicy::Dense | RoutingPolicy::SoftMoe { .. } => {
            softmax_topk::route_on(logits, experts, experts, false, threads)
        }
        RoutingPolicy::ExpertChoice => softmax_topk::route_on(logits, experts, 1, false, threads),
        RoutingPolicy::NoisyTopK { k, seed } => {
            let zeros;
            let noise_logits = match scores.noise_logits {
                Some(noise_logits) => noise_logits,
                None => {
                    zeros = vec![0.0; logits.len()];
                    &zeros
                }
            };
            noisy::route(logits, noise_logits, experts, k, seed)
        }
        RoutingPolicy::GroupLimited(group_limited) => group_limited.route(logits, experts, scores.bias.unwrap_or(&[])),
    }
}

/// Numerically stable softmax of `row`, appended to `out`.
pub(crate) fn softmax_into(row: &[f32], out: &mut Vec<f32>) {
    let start = out.len();
    out.resize(start + row.len(), 0.0);
    softmax_to(row, &mut out[start..]);
}

/// Numerically stable softmax of `row`, written to `out` (as long as `row`).
pub(crate) fn softmax_to(row: &[f32], out: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for (value, logit) in out.iter_mut().zip(row) {
        *value = (logit - max).exp();
    }
    let sum: f32 = out.iter().sum();
    for value in out {
        *value /= sum;
    }
}

/// The logistic function: DeepSeek-V3's expert scores and Qwen2-MoE's shared-expert gate.
pub(crate) fn sigmoid(logit: f32) -> f32 {
    1.0 / (1.0 + (-logit).exp())
}

/// Indices of `scores` ordered best first; ties go to the lower index, as `torch.topk` does on CPU.
pub(crate) fn ranked(scores: &[f32], order: &mut Vec<u32>) {
    order.clear();
    order.extend(0..scores.len() as u32);
    order.sort_by(|a, b| better_first(scores, *a, *b));
}

/// The `k` best indices of `scores` in [`ranked`]'s order, without ordering the rest: a selection,
/// then a sort of `k` (top-8 of 256 experts: a tenth of the full sort's time).
pub(crate) fn top_ranked(scores: &[f32], k: usize, order: &mut Vec<u32>) {
    order.clear();
    order.extend(0..scores.len() as u32);
    if k < order.len() {
        order.select_nth_unstable_by(k, |a, b| better_first(scores, *a, *b));
        order.truncate(k);
    }
    order.sort_by(|a, b| better_first(scores, *a, *b));
}

fn better_first(scores: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
    scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `switchyard local` prints the policy by these names.
    #[test]
    fn each_policy_has_its_name() {
        let named = [
            (RoutingPolicy::TopK { k: 2, renormalize: true }, "top-k (renormalised)"),
            (RoutingPolicy::TopK { k: 2, renormalize: false }, "top-k (softmax weights)"),
            (RoutingPolicy::NoisyTopK { k: 2, seed: 1 }, "noisy top-k"),
            (RoutingPolicy::Dense, "dense"),
            (RoutingPolicy::ExpertChoice, "expert choice"),
            (RoutingPolicy::GroupLimited(GroupLimited::deepseek_v3(8, 8, 4)), "group-limited (DeepSeek-V3)"),
            (RoutingPolicy::SoftMoe { slots: 1 }, "soft MoE"),
        ];
        for (policy, name) in named {
            assert_eq!(policy.name(), name);
        }
    }

    #[test]
    fn the_top_k_selection_equals_the_head_of_the_full_ranking() {
        let scores: Vec<f32> = (0..256).map(|i| ((i * 7919 % 257) as f32 / 16.0).floor()).collect();
        let (mut full, mut top) = (Vec::new(), Vec::new());
        ranked(&scores, &mut full);
        for k in [1, 2, 8, 255, 256] {
            top_ranked(&scores, k, &mut top);
            assert_eq!(top, full[..k], "k = {k}, ties included");
        }
    }
}
