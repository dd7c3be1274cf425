//! [`crate::RefusalPolicy::NextBest`]: a (token, expert) choice that a full worker refused, or
//! that throttling held back, goes to the token's most probable expert it does not use yet and
//! that a worker with room holds, weighted as [`crate::capacity::OverflowPolicy::Reroute`] weights
//! a re-routed choice (the new expert's probability, scaled as the original weight was); a choice
//! with no such expert overflows. A token never gets the same expert twice, however many rounds
//! of refusals the call goes through.

use std::collections::{BTreeMap, HashMap};

use crate::capacity::reroute;
use crate::replicas::Choice;
use crate::routing::Routing;
use crate::transport::Endpoint;

/// The experts each token of one call uses: its own choices, then the ones it was moved to.
#[derive(Debug, Default)]
pub struct TokenExperts(HashMap<u32, Vec<u32>>);

impl TokenExperts {
    fn of(&mut self, routing: &Routing, token: u32) -> &mut Vec<u32> {
        self.0.entry(token).or_insert_with(|| {
            let own = routing.token_choices(token as usize).iter().map(|(expert, _)| *expert);
            own.collect()
        })
    }
}

/// Where refused choices went.
#[derive(Debug, Default, PartialEq)]
pub struct Moved {
    /// The new (token, expert, weight) choices, by the worker to send them to.
    pub by_endpoint: BTreeMap<Endpoint, Vec<(u32, u32, f32)>>,
    /// (from, to) expert of every moved choice.
    pub moves: Vec<(u32, u32)>,
    /// (expert, choices) that found no other expert with room: they overflow.
    pub overflowed: Vec<(u32, usize)>,
}

/// Moves each refused (token, expert, weight) choice to the token's next-best expert among those
/// `holders_of` names a worker for that `choice` allows, on the worker `choice` picks.
pub fn move_to_next_best(
    refused: &[(u32, u32, f32)],
    routing: &Routing,
    used: &mut TokenExperts,
    choice: &mut Choice,
    holders_of: impl Fn(u32) -> Vec<Endpoint>,
) -> Moved {
    let mut moved = Moved::default();
    let mut overflowed: BTreeMap<u32, usize> = BTreeMap::new();
    // First choices before second ones, as capacity's re-route admits them: a token's better
    // choice gets the better alternative.
    let rank = |token: u32, expert: u32| {
        let own = routing.token_choices(token as usize).iter().position(|(chosen, _)| *chosen == expert);
        own.unwrap_or(usize::MAX)
    };
    let mut refused = refused.to_vec();
    refused.sort_by_key(|(token, expert, _)| (rank(*token, *expert), *token));
    for (token, expert, weight) in refused {
        let token_experts = used.of(routing, token);
        if !token_experts.contains(&expert) {
            token_experts.push(expert);
        }
        let next = (expert < routing.experts as u32)
            .then(|| reroute(routing, token, expert, weight, token_experts, |e| choice.allows(&holders_of(e))))
            .flatten();
        let Some(next) = next else {
            *overflowed.entry(expert).or_default() += 1;
            continue;
        };
        let Some(endpoint) = choice.pick(&holders_of(next.expert), 1).cloned() else { continue };
        token_experts.push(next.expert);
        moved.moves.push((expert, next.expert));
        moved.by_endpoint.entry(endpoint).or_default().push((token, next.expert, next.weight));
    }
    moved.overflowed = overflowed.into_iter().collect();
    moved
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::replicas::Replicas;

    fn any_holder() -> Choice {
        Replicas::default().choice(0, HashSet::new())
    }

    /// Two tokens over four experts, top-2: token 0 prefers 0 > 1 > 2 > 3, token 1 prefers 3 > 2 > 1 > 0.
    fn routing() -> Routing {
        let probabilities = vec![0.4, 0.3, 0.2, 0.1, 0.1, 0.2, 0.3, 0.4];
        Routing {
            tokens: 2,
            experts: 4,
            top_k: 2,
            choices: vec![(0, 0.4), (1, 0.3), (3, 0.4), (2, 0.3)],
            probabilities,
        }
    }

    #[test]
    fn a_refused_choice_goes_to_the_next_best_expert_with_room_at_its_weight() {
        let room = |expert: u32| {
            if expert == 3 { Vec::new() } else { vec![Endpoint::from(format!("w{}", expert % 2))] }
        };
        let mut used = TokenExperts::default();
        let moved = move_to_next_best(&[(0, 1, 0.3)], &routing(), &mut used, &mut any_holder(), room);
        assert_eq!(moved.moves, [(1, 2)], "expert 0 is the token's own: its next best is 2");
        assert_eq!(moved.by_endpoint[&Endpoint::from("w0")], [(0, 2, 0.2)], "0.2 scaled as 0.3 was (by 1)");
        // Refused again there: nothing left with room (3 is full, 0..2 used).
        let again = move_to_next_best(&[(0, 2, 0.2)], &routing(), &mut used, &mut any_holder(), room);
        assert_eq!((again.moves.len(), again.overflowed.clone()), (0, vec![(2, 1)]));
    }

    #[test]
    fn first_choices_move_before_second_ones_whatever_order_they_were_refused_in() {
        let everywhere = |_| vec![Endpoint::from("w")];
        let mut used = TokenExperts::default();
        // Token 1's second choice (expert 2) refused before token 0's first (expert 0).
        let refused = [(1, 2, 0.3), (0, 0, 0.4)];
        let moved = move_to_next_best(&refused, &routing(), &mut used, &mut any_holder(), everywhere);
        assert_eq!(moved.moves, [(0, 2), (2, 1)]);
    }

    #[test]
    fn weights_keep_the_routers_scaling_and_shared_experts_overflow() {
        let everywhere = |_| vec![Endpoint::from("w")];
        let mut used = TokenExperts::default();
        // Renormalised top-2 weights: 0.3 / 0.7 of token 1's expert 2 → scale 0.3/0.7 / 0.3.
        let scaled = 0.3 / 0.7;
        let moved =
            move_to_next_best(&[(1, 2, scaled), (1, 4, 1.0)], &routing(), &mut used, &mut any_holder(), everywhere);
        let (token, expert, weight) = moved.by_endpoint[&Endpoint::from("w")][0];
        assert_eq!((token, expert), (1, 1));
        assert!((weight - 0.2 * scaled / 0.3).abs() < 1e-6, "{weight}");
        assert_eq!(moved.overflowed, [(4, 1)], "a shared expert (4 of 4 routed) has no next best");
    }
}
