//! Softmax top-k, with and without renormalisation of the k weights (dense is k = experts).

use super::{Routing, softmax_to, top_ranked};
use crate::cpu::{chunks_for, in_turns};

/// Logits per thread below which routing stays on one: ~1 ms of softmax and top-k (512 tokens of
/// 256 experts; top-2 of 8 routes 4096 tokens in ~0.3 ms, not worth a thread), against the
/// ~50-100 µs a thread costs to start.
const LOGITS_PER_THREAD: usize = 1 << 17;

/// Softmax over each token's logits and its `k` best experts, its tokens in chunks that up to
/// `threads` threads (the calling one among them) take in turns. Each
/// token is routed alone, so the outcome is the same however they are split. On a many-core host
/// a serial routing was a third of DeepEP-normal's gate, whose GEMM runs on 8 threads.
pub fn route_on(logits: &[f32], experts: usize, k: usize, renormalize: bool, threads: usize) -> Routing {
    let tokens = logits.len() / experts;
    let mut probabilities = vec![0.0; tokens * experts];
    let mut choices = vec![(0, 0.0); tokens * k];
    let threads = routing_threads(logits.len(), threads);
    let per_chunk = tokens.div_ceil(chunks_for(threads)).max(1);
    let chunks = logits
        .chunks(per_chunk * experts)
        .zip(probabilities.chunks_mut(per_chunk * experts))
        .zip(choices.chunks_mut((per_chunk * k).max(1)));
    in_turns(threads, chunks, |((logits, probabilities), choices)| {
        route_into(logits, experts, k, renormalize, probabilities, choices);
    });
    Routing { tokens, experts, top_k: k, choices, probabilities }
}

/// Threads worth using, at most `threads`, to route `logits` logits.
fn routing_threads(logits: usize, threads: usize) -> usize {
    threads.min(logits / LOGITS_PER_THREAD).max(1)
}

/// Routes the tokens of `logits` into their rows of `probabilities` and `choices`.
fn route_into(
    logits: &[f32],
    experts: usize,
    k: usize,
    renormalize: bool,
    probabilities: &mut [f32],
    choices: &mut [(u32, f32)],
) {
    let mut order = Vec::with_capacity(experts);
    let rows = logits.chunks_exact(experts).zip(probabilities.chunks_exact_mut(experts));
    for (token, (row, row_probabilities)) in rows.enumerate() {
        softmax_to(row, row_probabilities);
        top_ranked(row_probabilities, k, &mut order);
        let total: f32 = if renormalize { order.iter().map(|e| row_probabilities[*e as usize]).sum() } else { 1.0 };
        for (slot, expert) in choices[token * k..(token + 1) * k].iter_mut().zip(&order) {
            *slot = (*expert, row_probabilities[*expert as usize] / total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_2_renormalised_as_mixtral() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let routing = route_on(&logits, 4, 2, true, 1);
        let e: Vec<f32> = logits.iter().map(|l| l.exp()).collect();
        let (p1, p2) = (e[1] / (e[1] + e[2]), e[2] / (e[1] + e[2]));
        assert_eq!(routing.choices[0].0, 1);
        assert_eq!(routing.choices[1].0, 2);
        assert!((routing.choices[0].1 - p1).abs() < 1e-6 && (routing.choices[1].1 - p2).abs() < 1e-6);
    }

    #[test]
    fn without_renormalisation_weights_are_softmax_probabilities() {
        let routing = route_on(&[0.0f32, 0.0, 0.0, 0.0], 4, 2, false, 1);
        assert_eq!(routing.choices, [(0, 0.25), (1, 0.25)], "ties go to the lower index");
        assert!((routing.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn tokens_split_over_threads_route_as_on_one() {
        let experts = 16;
        let tokens = 3 * LOGITS_PER_THREAD / experts + 7;
        let logits: Vec<f32> = (0..tokens * experts).map(|i| ((i * 7919 % 1013) as f32 * 0.37).sin() * 4.0).collect();
        for (k, renormalize) in [(3, true), (1, false), (experts, false)] {
            let one = route_on(&logits, experts, k, renormalize, 1);
            for threads in [2, 3, 8] {
                assert_eq!(route_on(&logits, experts, k, renormalize, threads), one, "k {k}, {threads} threads");
            }
        }
    }

    #[test]
    fn routing_goes_parallel_only_for_many_logits() {
        assert_eq!(routing_threads(0, 8), 1);
        assert_eq!(routing_threads(4096 * 8, 8), 1, "top-2 of 8 at 4096 tokens");
        assert_eq!(routing_threads(2 * LOGITS_PER_THREAD - 1, 8), 1);
        assert_eq!(routing_threads(2 * LOGITS_PER_THREAD, 8), 2);
        assert_eq!(routing_threads(4096 * 256, 8), 8, "DeepEP-normal's router");
        assert_eq!(routing_threads(4096 * 256, 3), 3);
    }

    #[test]
    fn dense_keeps_every_expert_with_its_probability() {
        let routing = route_on(&[0.0f32, 1.0_f32.ln()], 2, 2, false, 1);
        assert_eq!(routing.top_k, 2);
        assert_eq!(routing.choices, [(0, 0.5), (1, 0.5)]);
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let routing = route_on(&[1000.0, 999.0], 2, 1, true, 1);
        assert_eq!(routing.choices, [(0, 1.0)]);
        assert!(routing.probabilities.iter().all(|p| p.is_finite()));
    }
}
