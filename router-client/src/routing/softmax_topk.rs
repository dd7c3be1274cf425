//! Softmax top-k, with and without renormalisation of the k weights (dense is k = experts).

use super::{Routing, softmax_into, top_ranked};

pub fn route(logits: &[f32], experts: usize, k: usize, renormalize: bool) -> Routing {
    let tokens = logits.len() / experts;
    let mut probabilities = Vec::with_capacity(logits.len());
    let mut choices = Vec::with_capacity(tokens * k);
    let mut order = Vec::with_capacity(experts);
    for row in logits.chunks_exact(experts) {
        let start = probabilities.len();
        softmax_into(row, &mut probabilities);
        let row_probabilities = &probabilities[start..];
        top_ranked(row_probabilities, k, &mut order);
        let kept = &order[..];
        let total: f32 = if renormalize { kept.iter().map(|e| row_probabilities[*e as usize]).sum() } else { 1.0 };
        choices.extend(kept.iter().map(|e| (*e, row_probabilities[*e as usize] / total)));
    }
    Routing { tokens, experts, top_k: k, choices, probabilities }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_2_renormalised_as_mixtral() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let routing = route(&logits, 4, 2, true);
        let e: Vec<f32> = logits.iter().map(|l| l.exp()).collect();
        let (p1, p2) = (e[1] / (e[1] + e[2]), e[2] / (e[1] + e[2]));
        assert_eq!(routing.choices[0].0, 1);
        assert_eq!(routing.choices[1].0, 2);
        assert!((routing.choices[0].1 - p1).abs() < 1e-6 && (routing.choices[1].1 - p2).abs() < 1e-6);
    }

    #[test]
    fn without_renormalisation_weights_are_softmax_probabilities() {
        let routing = route(&[0.0f32, 0.0, 0.0, 0.0], 4, 2, false);
        assert_eq!(routing.choices, [(0, 0.25), (1, 0.25)], "ties go to the lower index");
        assert!((routing.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn dense_keeps_every_expert_with_its_probability() {
        let routing = route(&[0.0f32, 1.0_f32.ln()], 2, 2, false);
        assert_eq!(routing.top_k, 2);
        assert_eq!(routing.choices, [(0, 0.5), (1, 0.5)]);
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let routing = route(&[1000.0, 999.0], 2, 1, true);
        assert_eq!(routing.choices, [(0, 1.0)]);
        assert!(routing.probabilities.iter().all(|p| p.is_finite()));
    }
}
