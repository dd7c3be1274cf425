//! Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks"):
//! `H(x)_i = (x·W_g)_i + StandardNormal() · softplus((x·W_noise)_i)`,
//! `G(x) = softmax(KeepTopK(H(x), k))`: the experts outside the top k get −∞, so the k weights are
//! a softmax over the kept noisy logits only.
//!
//! The noise is seeded and a pure function of `(seed, token, expert)`, so the distributed layer and
//! the reference layer draw the same values.

use switchyard_model::synthetic::mix64;

use super::{Routing, ranked, softmax_into};

/// The standard normal draw for `(seed, token, expert)` (Box-Muller over two hashed uniforms).
pub fn noise(seed: u64, token: usize, expert: usize) -> f32 {
    let base = mix64(seed ^ mix64((token as u64) << 32 | expert as u64));
    let uniform = |bits: u64| ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let (u1, u2) = (uniform(mix64(base ^ 0x1)), uniform(mix64(base ^ 0x2)));
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn softplus(x: f32) -> f32 {
    // log(1 + e^x) without overflow for large x.
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

pub fn route(logits: &[f32], noise_logits: &[f32], experts: usize, k: usize, seed: u64) -> Routing {
    let tokens = logits.len() / experts;
    let mut probabilities = Vec::with_capacity(logits.len());
    let mut choices = Vec::with_capacity(tokens * k);
    let mut noisy = Vec::with_capacity(experts);
    let mut order = Vec::with_capacity(experts);
    let mut kept_logits = Vec::with_capacity(k);
    let mut kept_weights = Vec::with_capacity(k);
    for token in 0..tokens {
        let row = &logits[token * experts..(token + 1) * experts];
        let noise_row = &noise_logits[token * experts..(token + 1) * experts];
        noisy.clear();
        noisy.extend((0..experts).map(|expert| row[expert] + noise(seed, token, expert) * softplus(noise_row[expert])));
        // The probabilities reported for statistics are the softmax of the noisy logits.
        softmax_into(&noisy, &mut probabilities);
        ranked(&noisy, &mut order);
        kept_logits.clear();
        kept_logits.extend(order[..k].iter().map(|e| noisy[*e as usize]));
        kept_weights.clear();
        softmax_into(&kept_logits, &mut kept_weights);
        choices.extend(order[..k].iter().zip(&kept_weights).map(|(expert, weight)| (*expert, *weight)));
    }
    Routing { tokens, experts, top_k: k, choices, probabilities }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_seeded_and_standard_normal() {
        assert_eq!(noise(3, 10, 2), noise(3, 10, 2));
        assert_ne!(noise(3, 10, 2), noise(4, 10, 2));
        assert_ne!(noise(3, 10, 2), noise(3, 2, 10));
        let draws: Vec<f64> = (0..20_000).map(|t| f64::from(noise(1, t, 0))).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let variance = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        assert!(mean.abs() < 0.03 && (variance - 1.0).abs() < 0.05, "mean {mean}, variance {variance}");
    }

    /// The draws of `(seed, token, expert)` as Python computes them from the same formula: a seeded
    /// noisy-top-k routing stays the same across versions and can be rebuilt outside Switchyard.
    #[test]
    fn noise_draws_stay_pinned_to_their_formula() {
        let pinned = [
            ((0, 0, 0), 0.929_177_2),
            ((3, 10, 2), -0.360_516_43),
            ((1, 0, 255), -0.977_468_3),
            ((0xdead_beef, 4095, 7), -0.061_883_64),
        ];
        for ((seed, token, expert), expected) in pinned {
            let drawn = noise(seed, token, expert);
            assert!((drawn - expected).abs() < 1e-6, "noise({seed}, {token}, {expert}) = {drawn}, not {expected}");
        }
    }

    /// `log(1 + eˣ)`, finite however large the noise logit: past 88 `eˣ` overflows f32.
    #[test]
    fn softplus_stays_finite_for_large_inputs() {
        assert!((softplus(0.0) - std::f32::consts::LN_2).abs() < 1e-7);
        assert!((softplus(5.0) - 5.006_715).abs() < 1e-5);
        assert!(softplus(-30.0) < 1e-12);
        for large in [20.5, 100.0, 1e30] {
            assert_eq!(softplus(large), large);
        }
    }

    #[test]
    fn keep_top_k_is_a_softmax_over_the_noisy_kept_logits() {
        let logits = [2.0f32, 0.0, 1.0];
        let noise_logits = [-30.0f32, -30.0, -30.0];
        // softplus(-30) ~ 1e-13: the noise vanishes and this is plain top-2 renormalised.
        let routing = route(&logits, &noise_logits, 3, 2, 9);
        let (a, b) = (2.0f32.exp(), 1.0f32.exp());
        assert_eq!((routing.choices[0].0, routing.choices[1].0), (0, 2));
        assert!((routing.choices[0].1 - a / (a + b)).abs() < 1e-6);
        // Large noise scales change the choice for some seed.
        let loud = [5.0f32, 5.0, 5.0];
        let changed = (0..20).any(|seed| route(&logits, &loud, 3, 1, seed).choices[0].0 != 0);
        assert!(changed, "noise with softplus(5) ~ 5 must sometimes beat a logit gap of 1");
    }

    /// Shazeer et al.'s H(x)ᵢ = (x·W_g)ᵢ + StandardNormal() · Softplus((x·W_noise)ᵢ), token by token:
    /// the probabilities reported are its softmax, the choices its top-k renormalised.
    #[test]
    fn each_tokens_noisy_logits_are_its_logits_plus_noise_scaled_by_softplus() {
        let logits = [0.5f32, -1.0, 2.0, 1.0, 0.0, -0.5];
        let noise_logits = [0.3f32, 1.2, -0.4, 2.0, -1.0, 0.7];
        let routing = route(&logits, &noise_logits, 3, 2, 11);
        assert_eq!((routing.tokens, routing.choices.len()), (2, 4));
        for token in 0..2 {
            let noisy: Vec<f32> = (0..3)
                .map(|e| logits[token * 3 + e] + noise(11, token, e) * (1.0 + noise_logits[token * 3 + e].exp()).ln())
                .collect();
            let total: f32 = noisy.iter().map(|x| x.exp()).sum();
            for (expert, value) in noisy.iter().enumerate() {
                let reported = routing.probabilities[token * 3 + expert];
                assert!((reported - value.exp() / total).abs() < 1e-6, "token {token} expert {expert}");
            }
            let mut order: Vec<usize> = (0..3).collect();
            order.sort_by(|a, b| noisy[*b].total_cmp(&noisy[*a]));
            let kept = noisy[order[0]].exp() + noisy[order[1]].exp();
            let (first, weight) = routing.choices[token * 2];
            assert_eq!(first as usize, order[0]);
            assert!((weight - noisy[order[0]].exp() / kept).abs() < 1e-6);
        }
    }
}
