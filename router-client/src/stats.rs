//! Router statistics of one batch, the load-balancing quantities of the MoE literature:
//!
//! - Switch Transformer's auxiliary loss `α · N · Σᵢ fᵢ · Pᵢ`, with `fᵢ` the fraction of tokens whose
//!   first choice is expert i and `Pᵢ` the mean router probability of expert i (1.0·α when balanced);
//! - the importance CV² (Shazeer et al. 2017): importance of expert i is the sum of the gate weights
//!   routed to it, and CV² is its variance over its squared mean;
//! - the router z-loss (ST-MoE): the mean over tokens of `logsumexp(logits)²`;
//! - imbalance: the largest expert load over the mean load (kept assignments).

use crate::capacity::CapacityOutcome;
use crate::routing::Routing;

/// Switch Transformer's α.
pub const SWITCH_AUX_ALPHA: f32 = 0.01;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RouterStats {
    /// `α · N · Σ fᵢ · Pᵢ` with α = [`SWITCH_AUX_ALPHA`].
    pub switch_aux_loss: f32,
    pub importance_cv2: f32,
    pub z_loss: f32,
    /// max / mean of kept assignments per expert (1.0 is perfect balance).
    pub imbalance: f32,
}

impl std::ops::AddAssign for RouterStats {
    fn add_assign(&mut self, other: Self) {
        self.switch_aux_loss += other.switch_aux_loss;
        self.importance_cv2 += other.importance_cv2;
        self.z_loss += other.z_loss;
        self.imbalance += other.imbalance;
    }
}

impl RouterStats {
    /// Every statistic divided by `count` (the mean of `count` summed calls).
    pub fn mean_of(self, count: u64) -> Self {
        let count = count.max(1) as f32;
        Self {
            switch_aux_loss: self.switch_aux_loss / count,
            importance_cv2: self.importance_cv2 / count,
            z_loss: self.z_loss / count,
            imbalance: self.imbalance / count,
        }
    }
}

pub fn router_stats(logits: &[f32], routing: &Routing, capacity: &CapacityOutcome) -> RouterStats {
    let (tokens, experts) = (routing.tokens, routing.experts);
    if tokens == 0 || experts == 0 {
        return RouterStats::default();
    }
    let mut first_choice = vec![0.0f32; experts];
    let mut mean_probability = vec![0.0f32; experts];
    let mut importance = vec![0.0f32; experts];
    for token in 0..tokens {
        if let Some((expert, _)) = routing.token_choices(token).first() {
            first_choice[*expert as usize] += 1.0 / tokens as f32;
        }
        for (expert, probability) in routing.token_probabilities(token).iter().enumerate() {
            mean_probability[expert] += probability / tokens as f32;
        }
        for (expert, weight) in routing.token_choices(token) {
            importance[*expert as usize] += weight;
        }
    }
    let switch_aux_loss =
        SWITCH_AUX_ALPHA * experts as f32 * first_choice.iter().zip(&mean_probability).map(|(f, p)| f * p).sum::<f32>();
    // Soft MoE's logits are per slot: a row is whatever one token has.
    let z_loss = logits
        .chunks_exact(logits.len() / tokens)
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let logsumexp = max + row.iter().map(|logit| (logit - max).exp()).sum::<f32>().ln();
            logsumexp * logsumexp
        })
        .sum::<f32>()
        / tokens as f32;
    let loads: Vec<f32> = capacity.tokens_per_expert.iter().map(|load| *load as f32).collect();
    let mean_load = loads.iter().sum::<f32>() / experts as f32;
    let imbalance = if mean_load > 0.0 { loads.iter().copied().fold(0.0, f32::max) / mean_load } else { 0.0 };
    RouterStats { switch_aux_loss, importance_cv2: cv_squared(&importance), z_loss, imbalance }
}

/// Variance over squared mean (population variance), 0 for an all-zero vector.
fn cv_squared(values: &[f32]) -> f32 {
    let mean = values.iter().sum::<f32>() / values.len() as f32;
    if mean == 0.0 {
        return 0.0;
    }
    let variance = values.iter().map(|value| (value - mean).powi(2)).sum::<f32>() / values.len() as f32;
    variance / (mean * mean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::{OverflowPolicy, apply_capacity};

    /// Two tokens, two experts, top-1, computed by hand.
    #[test]
    fn hand_computed_tiny_case() {
        // Logits: token 0 = [ln 3, 0] -> p = [0.75, 0.25]; token 1 = [0, 0] -> p = [0.5, 0.5].
        let logits = [3.0f32.ln(), 0.0, 0.0, 0.0];
        let routing = crate::routing::route(
            crate::routing::GateScores { logits: &logits, noise_logits: None, bias: None },
            2,
            crate::routing::RoutingPolicy::TopK { k: 1, renormalize: false },
        );
        let experts: Vec<u32> = routing.choices.iter().map(|(expert, _)| *expert).collect();
        assert_eq!(experts, [0, 0], "both pick expert 0 (token 1 by the tie to the lower index)");
        assert!((routing.choices[0].1 - 0.75).abs() < 1e-6 && (routing.choices[1].1 - 0.5).abs() < 1e-6);
        let capacity = apply_capacity(&routing, 2, OverflowPolicy::Drop);
        let stats = router_stats(&logits, &routing, &capacity);
        // f = [1, 0], P = [0.625, 0.375]: 0.01 * 2 * 0.625 = 0.0125.
        assert!((stats.switch_aux_loss - 0.0125).abs() < 1e-7, "{stats:?}");
        // importance = [1.25, 0]: mean 0.625, variance 0.390625, CV² = 1.
        assert!((stats.importance_cv2 - 1.0).abs() < 1e-6);
        // z: logsumexp = ln 4 and ln 2: (ln² 4 + ln² 2) / 2.
        let expected_z = (4.0f32.ln().powi(2) + 2.0f32.ln().powi(2)) / 2.0;
        assert!((stats.z_loss - expected_z).abs() < 1e-6);
        // loads [2, 0]: max 2 over mean 1.
        assert_eq!(stats.imbalance, 2.0);
    }

    /// Top-2 of 3 experts with every figure worked by hand, and logits wider than the experts
    /// (Soft MoE's slot logits): the z-loss takes each token's row whatever its width.
    #[test]
    fn hand_computed_top_2_with_wide_logits() {
        let routing = Routing {
            tokens: 2,
            experts: 3,
            top_k: 2,
            choices: vec![(1, 0.6), (0, 0.3), (2, 0.5), (1, 0.4)],
            probabilities: vec![0.3, 0.6, 0.1, 0.1, 0.4, 0.5],
        };
        let logits = [0.0, 0.0, 0.0, 0.0, 2.0f32.ln(), 0.0, 0.0, 2.0f32.ln()];
        let capacity = CapacityOutcome { tokens_per_expert: vec![1, 2, 1], ..CapacityOutcome::default() };
        let stats = router_stats(&logits, &routing, &capacity);
        // f = [0, 0.5, 0.5] (first choices 1 and 2), P = [0.2, 0.5, 0.3]: 0.01 * 3 * 0.4.
        assert!((stats.switch_aux_loss - 0.012).abs() < 1e-7, "{stats:?}");
        // importance = [0.3, 1.0, 0.5]: mean 0.6, variance 0.26 / 3, over 0.36.
        assert!((stats.importance_cv2 - 0.26 / 3.0 / 0.36).abs() < 1e-6, "{stats:?}");
        // logsumexp = ln 4 and ln 6.
        let expected_z = (4.0f32.ln().powi(2) + 6.0f32.ln().powi(2)) / 2.0;
        assert!((stats.z_loss - expected_z).abs() < 1e-6, "{stats:?}");
        // loads [1, 2, 1]: max 2 over mean 4/3.
        assert!((stats.imbalance - 1.5).abs() < 1e-6, "{stats:?}");

        let nothing_kept = CapacityOutcome { tokens_per_expert: vec![0; 3], ..CapacityOutcome::default() };
        assert_eq!(router_stats(&logits, &routing, &nothing_kept).imbalance, 0.0, "no load, no imbalance");
        assert_eq!(cv_squared(&[0.0; 3]), 0.0);
        let no_tokens = Routing { tokens: 0, choices: Vec::new(), probabilities: Vec::new(), ..routing };
        assert_eq!(router_stats(&[], &no_tokens, &nothing_kept), RouterStats::default());
    }

    #[test]
    fn summed_calls_average_to_their_mean() {
        let stats = |value: f32| RouterStats {
            switch_aux_loss: value,
            importance_cv2: 2.0 * value,
            z_loss: 3.0 * value,
            imbalance: 4.0 * value,
        };
        let mut total = stats(1.0);
        total += stats(2.0);
        assert_eq!(total, stats(3.0));
        assert_eq!(total.mean_of(2), stats(1.5));
        assert_eq!(total.mean_of(0), total, "no calls counts as one");
    }
}
