//! The routing step both the distributed client and the reference layer run, so they cannot drift:
//! gate → policy → capacity → assignments grouped by expert.

use switchyard_model::ModelSpec;

use crate::capacity::{CapacityOutcome, apply_capacity};
use crate::error::ClientError;
use crate::gate::Gate;
use crate::routing::{Routing, RoutingPolicy, route};

/// The kept assignments of one expert, in token order.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertAssignments {
    pub expert: u32,
    pub tokens: Vec<u32>,
    pub weights: Vec<f32>,
}

/// How a layer call is routed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingConfig {
    pub policy: RoutingPolicy,
    pub capacity_factor: f32,
}

impl RoutingConfig {
    /// The model's own: top-k with Mixtral's renormalisation, its capacity factor.
    pub fn for_model(model: &ModelSpec) -> Self {
        Self {
            policy: RoutingPolicy::TopK { k: model.top_k as usize, renormalize: true },
            capacity_factor: model.capacity_factor,
        }
    }
}

/// Everything routing decided for one batch.
#[derive(Debug, Clone)]
pub struct Routed {
    pub logits: Vec<f32>,
    pub routing: Routing,
    pub capacity: CapacityOutcome,
    /// Experts with at least one kept assignment, ascending.
    pub groups: Vec<ExpertAssignments>,
}

/// Checks a layer call's arguments against `model`, naming the bad one.
pub fn check_call(model: &ModelSpec, layer: u32, hidden: &[f32]) -> Result<(), ClientError> {
    if layer >= model.layers {
        return Err(ClientError::InvalidInput {
            field: "layer",
            reason: format!("{layer} is not below the model's {} layers", model.layers),
        });
    }
    let d_model = model.d_model as usize;
    if hidden.is_empty() || !hidden.len().is_multiple_of(d_model) {
        return Err(ClientError::InvalidInput {
            field: "hidden",
            reason: format!("{} values is not a positive multiple of d_model {d_model}", hidden.len()),
        });
    }
    Ok(())
}

/// The routing of a call: the model's, with the caller's capacity factor if it gives one.
pub fn config_for_call(model: &ModelSpec, capacity_factor: Option<f32>) -> RoutingConfig {
    let mut config = RoutingConfig::for_model(model);
    if let Some(capacity_factor) = capacity_factor {
        config.capacity_factor = capacity_factor;
    }
    config
}

/// Runs the gate and the policy. Split from [`assign`] so callers can time them apart.
pub fn gate_and_route(gate: &Gate, hidden: &[f32], config: RoutingConfig) -> (Vec<f32>, Routing) {
    let logits = gate.logits(hidden);
    let routing = route(&logits, gate.experts(), config.policy);
    (logits, routing)
}

/// Applies capacity and groups the kept assignments by expert.
pub fn assign(logits: Vec<f32>, routing: Routing, config: RoutingConfig) -> Routed {
    let capacity =
        switchyard_model::expert_capacity(routing.tokens, routing.top_k, routing.experts, config.capacity_factor);
    let capacity = apply_capacity(&routing, capacity);
    let mut groups: Vec<ExpertAssignments> = (0..routing.experts as u32)
        .map(|expert| {
            let kept = capacity.tokens_per_expert[expert as usize] as usize;
            ExpertAssignments { expert, tokens: Vec::with_capacity(kept), weights: Vec::with_capacity(kept) }
        })
        .collect();
    for token in 0..routing.tokens {
        for (rank, (expert, weight)) in routing.token_choices(token).iter().enumerate() {
            if capacity.kept[token * routing.top_k + rank] {
                let group = &mut groups[*expert as usize];
                group.tokens.push(token as u32);
                group.weights.push(*weight);
            }
        }
    }
    groups.retain(|group| !group.tokens.is_empty());
    Routed { logits, routing, capacity, groups }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_hold_kept_assignments_in_token_order() {
        // Gate rows pick expert 0 for tokens whose first feature is large, expert 1 otherwise.
        let gate = Gate::from_weights(vec![1.0, 0.0, 0.0, 1.0], 2, 2);
        let hidden = [5.0, 0.0, 0.0, 5.0, 6.0, 0.0];
        let config = RoutingConfig { policy: RoutingPolicy::TopK { k: 1, renormalize: true }, capacity_factor: 1.0 };
        let (logits, routing) = gate_and_route(&gate, &hidden, config);
        let routed = assign(logits, routing, config);
        assert_eq!(routed.capacity.capacity, 2, "ceil(1 * 3 / 2 * 1.0)");
        assert_eq!(routed.groups.len(), 2);
        assert_eq!((routed.groups[0].expert, routed.groups[0].tokens.clone()), (0, vec![0, 2]));
        assert_eq!((routed.groups[1].expert, routed.groups[1].tokens.clone()), (1, vec![1]));
        assert_eq!(routed.groups[0].weights, [1.0, 1.0]);
    }
}
