//! Routing policies: from gate logits to each token's chosen experts and their weights.
//!
//! Top-k softmax as Mixtral (and Hugging Face's `MixtralSparseMoeBlock`) defines it: softmax over
//! all experts, keep the k largest, and optionally renormalise the k weights to sum to one.

/// How tokens choose experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RoutingPolicy {
    /// Softmax over all experts, top-k; `renormalize` rescales the k weights to sum to one
    /// (Mixtral), otherwise they stay softmax probabilities (Qwen2-MoE's `norm_topk_prob = false`).
    TopK { k: usize, renormalize: bool },
}

impl RoutingPolicy {
    pub fn top_k(self) -> usize {
        match self {
            RoutingPolicy::TopK { k, .. } => k,
        }
    }
}

/// Each token's choices, best first: `choices[t * k + rank] = (expert, weight)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub tokens: usize,
    pub experts: usize,
    pub top_k: usize,
    pub choices: Vec<(u32, f32)>,
    /// Softmax probabilities `[tokens, experts]`, kept for router statistics.
    pub probabilities: Vec<f32>,
}

impl Routing {
    pub fn token_choices(&self, token: usize) -> &[(u32, f32)] {
        &self.choices[token * self.top_k..(token + 1) * self.top_k]
    }
}

/// Applies `policy` to `logits` (`[tokens, experts]`).
pub fn route(logits: &[f32], experts: usize, policy: RoutingPolicy) -> Routing {
    let RoutingPolicy::TopK { k, renormalize } = policy;
    let tokens = logits.len() / experts;
    let mut probabilities = Vec::with_capacity(logits.len());
    let mut choices = Vec::with_capacity(tokens * k);
    let mut order: Vec<u32> = Vec::with_capacity(experts);
    for row in logits.chunks_exact(experts) {
        let start = probabilities.len();
        softmax_into(row, &mut probabilities);
        let row_probabilities = &probabilities[start..];
        order.clear();
        order.extend(0..experts as u32);
        // Highest probability first; ties go to the lower expert index, as torch.topk does on CPU.
        order.sort_by(|a, b| row_probabilities[*b as usize].total_cmp(&row_probabilities[*a as usize]).then(a.cmp(b)));
        let kept = &order[..k];
        let total: f32 = if renormalize { kept.iter().map(|e| row_probabilities[*e as usize]).sum() } else { 1.0 };
        choices.extend(kept.iter().map(|e| (*e, row_probabilities[*e as usize] / total)));
    }
    Routing { tokens, experts, top_k: k, choices, probabilities }
}

/// Numerically stable softmax of `row`, appended to `out`.
fn softmax_into(row: &[f32], out: &mut Vec<f32>) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let start = out.len();
    out.extend(row.iter().map(|logit| (logit - max).exp()));
    let sum: f32 = out[start..].iter().sum();
    for value in &mut out[start..] {
        *value /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_2_renormalised_as_mixtral() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let routing = route(&logits, 4, RoutingPolicy::TopK { k: 2, renormalize: true });
        let e: Vec<f32> = logits.iter().map(|l| l.exp()).collect();
        let (p1, p2) = (e[1] / (e[1] + e[2]), e[2] / (e[1] + e[2]));
        assert_eq!(routing.choices[0].0, 1);
        assert_eq!(routing.choices[1].0, 2);
        assert!((routing.choices[0].1 - p1).abs() < 1e-6 && (routing.choices[1].1 - p2).abs() < 1e-6);
    }

    #[test]
    fn without_renormalisation_weights_are_softmax_probabilities() {
        let logits = [0.0f32, 0.0, 0.0, 0.0];
        let routing = route(&logits, 4, RoutingPolicy::TopK { k: 2, renormalize: false });
        assert_eq!(routing.choices, [(0, 0.25), (1, 0.25)], "ties go to the lower index");
        assert!((routing.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let routing = route(&[1000.0, 999.0], 2, RoutingPolicy::TopK { k: 1, renormalize: true });
        assert_eq!(routing.choices, [(0, 1.0)]);
        assert!(routing.probabilities.iter().all(|p| p.is_finite()));
    }
}
