//! Expert capacity: each expert takes at most `capacity` assignments per batch; the rest overflow
//! and contribute nothing (the token keeps its residual path).
//!
//! Order of admission, as GShard: every token's first choice (in token order) before any second
//! choice, so a token's best expert outranks another token's fallback.

use crate::routing::Routing;

/// Which assignments survived capacity.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityOutcome {
    pub capacity: usize,
    /// Aligned with `Routing::choices`.
    pub kept: Vec<bool>,
    /// Assignments kept per expert.
    pub tokens_per_expert: Vec<u32>,
    /// Assignments dropped by capacity.
    pub dropped: usize,
}

pub fn apply_capacity(routing: &Routing, capacity: usize) -> CapacityOutcome {
    let mut kept = vec![false; routing.choices.len()];
    let mut tokens_per_expert = vec![0u32; routing.experts];
    let mut dropped = 0;
    for rank in 0..routing.top_k {
        for token in 0..routing.tokens {
            let index = token * routing.top_k + rank;
            let expert = routing.choices[index].0 as usize;
            if (tokens_per_expert[expert] as usize) < capacity {
                tokens_per_expert[expert] += 1;
                kept[index] = true;
            } else {
                dropped += 1;
            }
        }
    }
    CapacityOutcome { capacity, kept, tokens_per_expert, dropped }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(choices: Vec<(u32, f32)>, top_k: usize, experts: usize) -> Routing {
        let tokens = choices.len() / top_k;
        Routing { tokens, experts, top_k, choices, probabilities: vec![0.0; tokens * experts] }
    }

    #[test]
    fn first_choices_outrank_second_choices_and_later_tokens_overflow() {
        // Three tokens, top-2. Expert 0 is everyone's first choice; capacity 2.
        let routing = routing(vec![(0, 0.6), (1, 0.4), (0, 0.7), (2, 0.3), (0, 0.5), (1, 0.5)], 2, 3);
        let outcome = apply_capacity(&routing, 2);
        assert_eq!(outcome.kept, [true, true, true, true, false, true]);
        assert_eq!(outcome.tokens_per_expert, [2, 2, 1]);
        assert_eq!(outcome.dropped, 1);
    }

    #[test]
    fn a_large_capacity_keeps_everything() {
        let routing = routing(vec![(1, 1.0), (1, 1.0)], 1, 2);
        let outcome = apply_capacity(&routing, 10);
        assert_eq!((outcome.dropped, outcome.tokens_per_expert.clone()), (0, vec![0, 2]));
    }
}
