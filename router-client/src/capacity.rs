//! Expert capacity: each expert takes at most `capacity` assignments per batch. What happens to an
//! assignment past it is the overflow policy:
//!
//! - [`OverflowPolicy::Drop`] (Switch, GShard): it contributes nothing; the token keeps its residual
//!   path. Admission order: every token's first choice (in token order) before any second choice.
//! - [`OverflowPolicy::Reroute`]: it goes to the token's next-preferred expert (by router
//!   probability) that has room and that the token does not already use; dropped if none has room.
//! - [`OverflowPolicy::BatchPrioritized`] (V-MoE, Riquelme et al. 2021): as Drop, but tokens are
//!   admitted in order of their top gate weight, so the least confident tokens are the ones dropped.
//!
//! [`expert_choice`] inverts the matching: each expert takes its best `capacity` tokens, so nothing
//! overflows (some tokens may get no expert).

use crate::routing::Routing;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverflowPolicy {
    #[default]
    Drop,
    Reroute,
    BatchPrioritized,
}

/// One kept assignment: token `token`'s output gets `weight · expert(x_token)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignment {
    pub token: u32,
    pub expert: u32,
    pub weight: f32,
}

/// What survived capacity.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CapacityOutcome {
    pub capacity: usize,
    pub kept: Vec<Assignment>,
    pub tokens_per_expert: Vec<u32>,
    /// Assignments (token choice) or tokens (expert choice) that got no expert.
    pub dropped: usize,
    /// Assignments moved to another expert by [`OverflowPolicy::Reroute`].
    pub rerouted: usize,
}

/// Keeps every choice of a token-choice `routing`: the dropless policy. Nothing can overflow, so
/// this path has no capacity to compare with and never drops; `capacity` reports the batch size.
pub fn keep_every_choice(routing: &Routing) -> CapacityOutcome {
    let mut outcome =
        CapacityOutcome { capacity: routing.tokens, tokens_per_expert: vec![0; routing.experts], ..Default::default() };
    outcome.kept.reserve(routing.choices.len());
    for rank in 0..routing.top_k {
        for token in 0..routing.tokens {
            let (expert, weight) = routing.token_choices(token)[rank];
            outcome.tokens_per_expert[expert as usize] += 1;
            outcome.kept.push(Assignment { token: token as u32, expert, weight });
        }
    }
    outcome
}

/// Applies `capacity` to a token-choice `routing` under `policy`, the whole call as one group.
pub fn apply_capacity(routing: &Routing, capacity: usize, policy: OverflowPolicy) -> CapacityOutcome {
    apply_capacity_in_groups(routing, capacity, policy, routing.tokens)
}

/// Applies `capacity` to each group of `group_tokens` consecutive tokens on its own: an expert takes
/// up to `capacity` assignments from every group. A group is a sequence for Switch Transformers,
/// whose capacity counts tokens in order within each sequence of the batch.
pub fn apply_capacity_in_groups(
    routing: &Routing,
    capacity: usize,
    policy: OverflowPolicy,
    group_tokens: usize,
) -> CapacityOutcome {
    let group_tokens = group_tokens.max(1);
    let mut token_order: Vec<u32> = (0..routing.tokens as u32).collect();
    if policy == OverflowPolicy::BatchPrioritized {
        // Highest top gate weight first; equal weights keep token order (a stable sort).
        let top_weight = |token: u32| routing.token_choices(token as usize).first().map_or(0.0, |choice| choice.1);
        token_order.sort_by(|a, b| top_weight(*b).total_cmp(&top_weight(*a)));
    }
    let mut outcome = CapacityOutcome { capacity, tokens_per_expert: vec![0; routing.experts], ..Default::default() };
    // Assignments each (group, expert) took so far.
    let mut load = vec![0usize; routing.tokens.div_ceil(group_tokens) * routing.experts];
    let slot = |token: u32, expert: u32| (token as usize / group_tokens) * routing.experts + expert as usize;
    // Experts each token already uses, so a re-routed assignment never lands on one of them.
    let mut used: Vec<Vec<u32>> = vec![Vec::new(); if policy == OverflowPolicy::Reroute { routing.tokens } else { 0 }];
    if policy == OverflowPolicy::Reroute {
        for (token, experts) in used.iter_mut().enumerate() {
            experts.extend(routing.token_choices(token).iter().map(|(expert, _)| *expert));
        }
    }
    for rank in 0..routing.top_k {
        for &token in &token_order {
            let (expert, weight) = routing.token_choices(token as usize)[rank];
            let assignment = if load[slot(token, expert)] < capacity {
                Some(Assignment { token, expert, weight })
            } else if policy == OverflowPolicy::Reroute {
                let has_room = |candidate: u32| load[slot(token, candidate)] < capacity;
                let rerouted = reroute(routing, token, expert, weight, &used[token as usize], has_room);
                if let Some(assignment) = rerouted {
                    used[token as usize].push(assignment.expert);
                    outcome.rerouted += 1;
                }
                rerouted
            } else {
                None
            };
            let Some(assignment) = assignment else {
                outcome.dropped += 1;
                continue;
            };
            load[slot(token, assignment.expert)] += 1;
            outcome.tokens_per_expert[assignment.expert as usize] += 1;
            outcome.kept.push(assignment);
        }
    }
    outcome
}

/// The token's best expert with room that it does not use yet. Its weight is its router
/// probability scaled as the overflowed choice's was (so renormalised policies stay renormalised).
pub(crate) fn reroute(
    routing: &Routing,
    token: u32,
    full_expert: u32,
    full_weight: f32,
    used: &[u32],
    has_room: impl Fn(u32) -> bool,
) -> Option<Assignment> {
    let probabilities = routing.token_probabilities(token as usize);
    let scale = full_weight / probabilities[full_expert as usize].max(f32::MIN_POSITIVE);
    // The most probable eligible expert; on equal probability the lower index (max_by keeps the last).
    let expert = (0..routing.experts as u32)
        .filter(|expert| !used.contains(expert) && has_room(*expert))
        .max_by(|a, b| probabilities[*a as usize].total_cmp(&probabilities[*b as usize]).then(b.cmp(a)))?;
    Some(Assignment { token, expert, weight: probabilities[expert as usize] * scale })
}

/// Expert choice (Zhou et al. 2022): each expert takes the `capacity` tokens with the highest
/// router probability for it (ties to the lower token index); the weight is that probability.
pub fn expert_choice(routing: &Routing, capacity: usize) -> CapacityOutcome {
    let mut outcome = CapacityOutcome { capacity, tokens_per_expert: vec![0; routing.experts], ..Default::default() };
    let mut served = vec![false; routing.tokens];
    let mut order: Vec<u32> = Vec::with_capacity(routing.tokens);
    for expert in 0..routing.experts {
        let score = |token: u32| routing.probabilities[token as usize * routing.experts + expert];
        order.clear();
        order.extend(0..routing.tokens as u32);
        order.sort_by(|a, b| score(*b).total_cmp(&score(*a)).then(a.cmp(b)));
        for &token in order.iter().take(capacity) {
            outcome.kept.push(Assignment { token, expert: expert as u32, weight: score(token) });
            served[token as usize] = true;
        }
        outcome.tokens_per_expert[expert] = order.len().min(capacity) as u32;
    }
    outcome.dropped = served.iter().filter(|served| !**served).count();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(choices: Vec<(u32, f32)>, top_k: usize, probabilities: Vec<f32>) -> Routing {
        let tokens = choices.len() / top_k;
        let experts = probabilities.len() / tokens;
        Routing { tokens, experts, top_k, choices, probabilities }
    }

    fn kept(outcome: &CapacityOutcome) -> Vec<(u32, u32)> {
        outcome.kept.iter().map(|a| (a.token, a.expert)).collect()
    }

    /// Three tokens, top-2 over 3 experts; expert 0 is everyone's first choice.
    fn crowded() -> Routing {
        let probabilities = vec![0.6, 0.3, 0.1, 0.7, 0.1, 0.2, 0.5, 0.4, 0.1];
        routing(vec![(0, 0.6), (1, 0.3), (0, 0.7), (2, 0.2), (0, 0.5), (1, 0.4)], 2, probabilities)
    }

    #[test]
    fn drop_admits_first_choices_before_second_choices_in_token_order() {
        let outcome = apply_capacity(&crowded(), 2, OverflowPolicy::Drop);
        assert_eq!(kept(&outcome), [(0, 0), (1, 0), (0, 1), (1, 2), (2, 1)]);
        assert_eq!((outcome.tokens_per_expert.clone(), outcome.dropped), (vec![2, 2, 1], 1));
    }

    #[test]
    fn reroute_sends_the_overflow_to_the_next_choice_with_room() {
        let outcome = apply_capacity(&crowded(), 2, OverflowPolicy::Reroute);
        // Token 2's expert 0 is full; its next unused choice is expert 2 (expert 1 it already uses).
        assert_eq!(outcome.kept[2], Assignment { token: 2, expert: 2, weight: 0.1 });
        assert_eq!((outcome.rerouted, outcome.dropped), (1, 0));
        assert_eq!(outcome.tokens_per_expert, [2, 2, 2]);
    }

    #[test]
    fn batch_prioritized_drops_the_least_confident_token() {
        let outcome = apply_capacity(&crowded(), 2, OverflowPolicy::BatchPrioritized);
        // Priority by top weight: token 1 (0.7), token 0 (0.6), token 2 (0.5): token 2's first choice drops.
        assert_eq!(&kept(&outcome)[..2], [(1, 0), (0, 0)]);
        assert!(!outcome.kept.iter().any(|a| a.token == 2 && a.expert == 0));
        assert_eq!(outcome.dropped, 1);
    }

    #[test]
    fn each_group_has_its_own_capacity() {
        // Four tokens, top-1, all to expert 0: with capacity 1 the whole call keeps one, two
        // sequences of two tokens keep the first token of each.
        let all_to_zero = routing(vec![(0, 0.9); 4], 1, [0.9, 0.1].repeat(4));
        assert_eq!(kept(&apply_capacity(&all_to_zero, 1, OverflowPolicy::Drop)), [(0, 0)]);
        let per_sequence = apply_capacity_in_groups(&all_to_zero, 1, OverflowPolicy::Drop, 2);
        assert_eq!(kept(&per_sequence), [(0, 0), (2, 0)]);
        assert_eq!((per_sequence.tokens_per_expert.clone(), per_sequence.dropped), (vec![2, 0], 2));
        let rerouted = apply_capacity_in_groups(&all_to_zero, 1, OverflowPolicy::Reroute, 2);
        assert_eq!(kept(&rerouted), [(0, 0), (1, 1), (2, 0), (3, 1)], "the overflow moves within its sequence");
    }

    #[test]
    fn dropless_keeps_every_choice_however_crowded() {
        // Every token's both choices land on expert 0 or 1: any capacity below 3 would drop.
        let probabilities = vec![0.6, 0.4, 0.0, 0.7, 0.3, 0.0, 0.5, 0.5, 0.0];
        let crowded = routing(vec![(0, 0.6), (1, 0.4), (0, 0.7), (1, 0.3), (0, 0.5), (1, 0.5)], 2, probabilities);
        let outcome = keep_every_choice(&crowded);
        assert_eq!((outcome.dropped, outcome.kept.len()), (0, 6));
        assert_eq!(outcome.tokens_per_expert, [3, 3, 0]);
        assert_eq!(outcome.capacity, 3, "no capacity applies: the batch is reported");
        assert_eq!(
            kept(&outcome),
            [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)],
            "GShard's order, like apply_capacity"
        );
    }

    #[test]
    fn expert_choice_lets_each_expert_pick_its_best_tokens() {
        let outcome = expert_choice(&crowded(), 1);
        assert_eq!(kept(&outcome), [(1, 0), (2, 1), (1, 2)]);
        assert_eq!(outcome.kept[0].weight, 0.7);
        assert_eq!(outcome.dropped, 1, "token 0 is nobody's best");
        assert_eq!(outcome.capacity, 1);
    }

    #[test]
    fn reroute_never_fills_an_expert_past_its_capacity() {
        // Three tokens, top-1, all to expert 0, expert 1 everyone's next best; capacity 1.
        let all_to_zero = routing(vec![(0, 0.9); 3], 1, [0.9, 0.1].repeat(3));
        let outcome = apply_capacity(&all_to_zero, 1, OverflowPolicy::Reroute);
        assert_eq!(kept(&outcome), [(0, 0), (1, 1)], "token 2 finds expert 1 full too");
        assert_eq!((outcome.tokens_per_expert.clone(), outcome.rerouted, outcome.dropped), (vec![1, 1], 1, 1));
    }
}
