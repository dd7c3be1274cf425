//! The routing step both the distributed client and the reference layer run, so they cannot drift:
//! gate → policy → capacity (or expert choice) → assignments grouped by expert, with statistics.

use std::ops::Range;

use switchyard_model::{CapacityPolicy, ModelSpec, expert_capacity};

use crate::capacity::{
    CapacityOutcome, OverflowPolicy, apply_capacity, apply_capacity_in_groups, expert_choice, keep_every_choice,
};
use crate::codec::accumulate;
use crate::error::ClientError;
use crate::gate::Gate;
use crate::routing::{GateScores, GroupLimited, Routing, RoutingPolicy, route_on, soft};
use crate::stats::{RouterStats, router_stats};

/// What one expert computes in a call: rows of the input (one per kept assignment, in token
/// order, with its weight) or, for Soft MoE, its slot inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertAssignments {
    pub expert: u32,
    pub tokens: Vec<u32>,
    pub weights: Vec<f32>,
    /// Soft MoE only (then `tokens` is empty).
    pub slots: Option<SlotRows>,
}

/// Soft MoE slot inputs of one expert.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotRows {
    /// Column of this expert's first slot in the combine weights.
    pub first_slot: usize,
    /// `[slots, d_model]`.
    pub inputs: Vec<f32>,
}

impl ExpertAssignments {
    /// Rows this expert computes.
    pub fn rows(&self, d_model: usize) -> usize {
        match &self.slots {
            Some(slots) => slots.inputs.len() / d_model,
            None => self.tokens.len(),
        }
    }

    /// Appends the f32 input rows `range` of this group to `out`.
    pub fn input_rows(&self, hidden: &[f32], d_model: usize, range: Range<usize>, out: &mut Vec<f32>) {
        match &self.slots {
            Some(slots) => out.extend_from_slice(&slots.inputs[range.start * d_model..range.end * d_model]),
            None => {
                for token in &self.tokens[range] {
                    let start = *token as usize * d_model;
                    out.extend_from_slice(&hidden[start..start + d_model]);
                }
            }
        }
    }
}

/// How a layer call is routed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingConfig {
    pub policy: RoutingPolicy,
    pub overflow: OverflowPolicy,
    pub capacity: CapacityPolicy,
    /// Tokens per sequence when a call holds several sequences of equal length: a per-sequence
    /// capacity (Switch Transformers) then applies to each. `None`: the call is one sequence.
    pub sequence_tokens: Option<usize>,
    /// Always-on experts after the routed ones (the model's, not a caller's choice).
    pub shared_experts: usize,
}

impl RoutingConfig {
    /// The model's own: its router (softmax top-k, renormalised or not; DeepSeek's group-limited
    /// sigmoid or softmax), overflow dropped, its capacity policy.
    pub fn for_model(model: &ModelSpec) -> Self {
        let router = model.router;
        let k = model.top_k as usize;
        let policy = if router.is_softmax_top_k() {
            RoutingPolicy::TopK { k, renormalize: router.renormalize }
        } else {
            RoutingPolicy::GroupLimited(GroupLimited {
                k,
                groups: router.groups as usize,
                top_groups: router.top_groups as usize,
                renormalize: router.renormalize,
                scaling: router.scaling,
                scoring: router.scoring,
                group_score: router.group_score,
            })
        };
        Self {
            policy,
            overflow: OverflowPolicy::Drop,
            capacity: model.capacity,
            sequence_tokens: None,
            shared_experts: model.shared_experts as usize,
        }
    }

    /// Checks the call's capacity, and that its `tokens` tokens are a whole number of this
    /// config's sequences.
    pub fn check_call(&self, tokens: usize) -> Result<(), ClientError> {
        match self.capacity {
            CapacityPolicy::Factor(factor) if !(factor > 0.0 && factor.is_finite()) => {
                let reason = format!("{factor} is not a positive, finite capacity factor");
                return Err(ClientError::InvalidInput { field: "capacity_factor", reason });
            }
            CapacityPolicy::PerSequence(0) => {
                return Err(ClientError::InvalidInput { field: "expert_capacity", reason: "must be positive".into() });
            }
            _ => {}
        }
        match self.sequence_tokens {
            Some(0) => Err(ClientError::InvalidInput { field: "sequence_tokens", reason: "must be positive".into() }),
            Some(sequence) if !tokens.is_multiple_of(sequence) => Err(ClientError::InvalidInput {
                field: "hidden",
                reason: format!("{tokens} tokens are not a whole number of sequences of {sequence} tokens"),
            }),
            _ => Ok(()),
        }
    }
}

/// Everything routing decided for one batch.
#[derive(Debug, Clone)]
pub struct Routed {
    pub logits: Vec<f32>,
    pub routing: Routing,
    pub capacity: CapacityOutcome,
    /// Experts with at least one kept assignment, ascending, then the shared experts.
    pub groups: Vec<ExpertAssignments>,
    pub stats: RouterStats,
    /// Soft MoE's combine weights `[tokens, experts * slots]`.
    pub soft_combine: Option<Vec<f32>>,
}

impl Routed {
    /// Adds `rows`, the expert outputs of `group`'s rows `range`, into `output` (`[tokens, d_model]`).
    pub fn combine_rows(
        &self,
        group: &ExpertAssignments,
        range: Range<usize>,
        rows: &[f32],
        d_model: usize,
        output: &mut [f32],
    ) {
        let (Some(slots), Some(combine)) = (&group.slots, &self.soft_combine) else {
            accumulate(output, d_model, &group.tokens[range.clone()], &group.weights[range], rows);
            return;
        };
        let columns = combine.len() / self.routing.tokens;
        for (token, out) in output.chunks_exact_mut(d_model).enumerate() {
            let weights = &combine[token * columns + slots.first_slot + range.start..];
            for (weight, row) in weights.iter().zip(rows.chunks_exact(d_model)) {
                for (value, expert_value) in out.iter_mut().zip(row) {
                    *value += weight * expert_value;
                }
            }
        }
    }
}

/// Routing facts of one call, as callers and reports see them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoutingSummary {
    pub tokens: usize,
    /// Assignments the policy made before capacity (`tokens * top_k` for token choice).
    pub assignments: usize,
    /// Assignments (token choice) or tokens (expert choice) left without an expert by capacity.
    pub dropped: usize,
    /// Assignments moved to a token's next choice by overflow re-routing.
    pub rerouted: usize,
    /// Assignments a full expert queue refused and the client let overflow
    /// ([`crate::client::RefusalPolicy::Overflow`]); not in `tokens_per_expert`.
    pub refused: usize,
    pub capacity: usize,
    pub tokens_per_expert: Vec<u32>,
    pub stats: RouterStats,
}

impl RoutingSummary {
    pub fn from_routed(routed: &Routed) -> Self {
        Self {
            tokens: routed.routing.tokens,
            assignments: routed.routing.choices.len(),
            dropped: routed.capacity.dropped,
            rerouted: routed.capacity.rerouted,
            refused: 0,
            capacity: routed.capacity.capacity,
            tokens_per_expert: routed.capacity.tokens_per_expert.clone(),
            stats: routed.stats,
        }
    }
}

/// Checks a layer call's arguments against `model`, naming the bad one.
pub fn check_call(model: &ModelSpec, layer: u32, hidden: &[f32]) -> Result<(), ClientError> {
    if model.layer_index(layer).is_none() {
        return Err(ClientError::InvalidInput {
            field: "layer",
            reason: format!(
                "{layer} is not a MoE layer of {}; its MoE layers are {}",
                model.name,
                model.describe_layers()
            ),
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

/// What a caller changes of the model's routing; `None` keeps the model's.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RoutingOverrides {
    pub policy: Option<RoutingPolicy>,
    pub overflow: Option<OverflowPolicy>,
    pub capacity: Option<CapacityPolicy>,
    /// The call holds sequences of this many tokens each (see [`RoutingConfig::sequence_tokens`]).
    pub sequence_tokens: Option<usize>,
}

/// The routing of a call: the model's, with the caller's overrides.
pub fn config_for_call(model: &ModelSpec, overrides: &RoutingOverrides) -> RoutingConfig {
    let model_config = RoutingConfig::for_model(model);
    RoutingConfig {
        policy: overrides.policy.unwrap_or(model_config.policy),
        overflow: overrides.overflow.unwrap_or(model_config.overflow),
        capacity: overrides.capacity.unwrap_or(model_config.capacity),
        sequence_tokens: overrides.sequence_tokens,
        shared_experts: model_config.shared_experts,
    }
}

/// Runs the gate and the policy. Split from [`assign`] so callers can time them apart.
/// For Soft MoE the logits are the slot logits `[tokens, experts * slots]`.
pub fn gate_and_route(gate: &Gate, hidden: &[f32], config: RoutingConfig) -> (Vec<f32>, Routing) {
    if let RoutingPolicy::SoftMoe { slots } = config.policy {
        let logits = gate.slot_logits(hidden, slots);
        let tokens = hidden.len() / gate.d_model();
        let combine = soft::weights(&logits, tokens).combine;
        return (logits, soft::routing(&combine, tokens, gate.experts()));
    }
    let logits = gate.logits(hidden);
    let noise_logits = match config.policy {
        RoutingPolicy::NoisyTopK { .. } => gate.noise_logits(hidden),
        _ => None,
    };
    let scores = GateScores { logits: &logits, noise_logits: noise_logits.as_deref(), bias: gate.correction_bias() };
    let routing = route_on(scores, gate.experts(), config.policy, gate.threads());
    (logits, routing)
}

/// Applies capacity (or lets experts choose, or mixes slots), groups the work by expert, and adds
/// the shared experts, which take every token.
pub fn assign(gate: &Gate, hidden: &[f32], logits: Vec<f32>, routing: Routing, config: RoutingConfig) -> Routed {
    let mut routed = match config.policy {
        RoutingPolicy::SoftMoe { slots } => assign_soft(hidden, logits, routing, slots),
        _ => assign_routed(logits, routing, config),
    };
    if config.shared_experts > 0 {
        let tokens = routed.routing.tokens;
        let weights = gate.shared_weights(hidden, config.shared_experts);
        for shared in 0..config.shared_experts {
            routed.groups.push(ExpertAssignments {
                expert: (routed.routing.experts + shared) as u32,
                tokens: (0..tokens as u32).collect(),
                weights: weights.iter().skip(shared).step_by(config.shared_experts).copied().collect(),
                slots: None,
            });
        }
    }
    routed
}

fn assign_routed(logits: Vec<f32>, routing: Routing, config: RoutingConfig) -> Routed {
    let (tokens, experts) = (routing.tokens, routing.experts);
    let capacity = match config.policy {
        // Expert choice needs a capacity by nature; a dropless model gives each expert an even share.
        RoutingPolicy::ExpertChoice => expert_choice(
            &routing,
            config.capacity.capacity(tokens, 1, experts).unwrap_or_else(|| expert_capacity(tokens, 1, experts, 1.0)),
        ),
        _ => match (config.capacity, config.capacity.capacity(tokens, routing.top_k, experts)) {
            (_, None) => keep_every_choice(&routing),
            (CapacityPolicy::PerSequence(_), Some(capacity)) => {
                apply_capacity_in_groups(&routing, capacity, config.overflow, config.sequence_tokens.unwrap_or(tokens))
            }
            (_, Some(capacity)) => apply_capacity(&routing, capacity, config.overflow),
        },
    };
    let mut groups: Vec<ExpertAssignments> = (0..experts as u32)
        .map(|expert| {
            let kept = capacity.tokens_per_expert[expert as usize] as usize;
            ExpertAssignments {
                expert,
                tokens: Vec::with_capacity(kept),
                weights: Vec::with_capacity(kept),
                slots: None,
            }
        })
        .collect();
    let mut kept = capacity.kept.clone();
    kept.sort_by_key(|assignment| (assignment.expert, assignment.token));
    for assignment in kept {
        let group = &mut groups[assignment.expert as usize];
        group.tokens.push(assignment.token);
        group.weights.push(assignment.weight);
    }
    groups.retain(|group| !group.tokens.is_empty());
    let stats = router_stats(&logits, &routing, &capacity);
    Routed { logits, routing, capacity, groups, stats, soft_combine: None }
}

fn assign_soft(hidden: &[f32], logits: Vec<f32>, routing: Routing, slots: usize) -> Routed {
    let (tokens, experts) = (routing.tokens, routing.experts);
    let d_model = hidden.len() / tokens;
    let weights = soft::weights(&logits, tokens);
    let inputs = soft::slot_inputs(&weights.dispatch, hidden, d_model);
    let groups = inputs
        .chunks_exact(slots * d_model)
        .enumerate()
        .map(|(expert, expert_inputs)| ExpertAssignments {
            expert: expert as u32,
            tokens: Vec::new(),
            weights: Vec::new(),
            slots: Some(SlotRows { first_slot: expert * slots, inputs: expert_inputs.to_vec() }),
        })
        .collect();
    let capacity =
        CapacityOutcome { capacity: slots, tokens_per_expert: vec![slots as u32; experts], ..Default::default() };
    let stats = router_stats(&logits, &routing, &capacity);
    Routed { logits, routing, capacity, groups, stats, soft_combine: Some(weights.combine) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_hold_kept_assignments_in_token_order() {
        // Gate rows pick expert 0 for tokens whose first feature is large, expert 1 otherwise.
        let gate = Gate::from_weights(vec![1.0, 0.0, 0.0, 1.0], 2, 2);
        let hidden = [5.0, 0.0, 0.0, 5.0, 6.0, 0.0];
        let config = RoutingConfig {
            policy: RoutingPolicy::TopK { k: 1, renormalize: true },
            overflow: OverflowPolicy::Drop,
            capacity: CapacityPolicy::Factor(1.0),
            sequence_tokens: None,
            shared_experts: 0,
        };
        let (logits, routing) = gate_and_route(&gate, &hidden, config);
        let routed = assign(&gate, &hidden, logits, routing, config);
        assert_eq!(routed.capacity.capacity, 2, "ceil(1 * 3 / 2 * 1.0)");
        assert_eq!(routed.groups.len(), 2);
        assert_eq!((routed.groups[0].expert, routed.groups[0].tokens.clone()), (0, vec![0, 2]));
        assert_eq!((routed.groups[1].expert, routed.groups[1].tokens.clone()), (1, vec![1]));
        assert_eq!(routed.groups[0].weights, [1.0, 1.0]);
        let summary = RoutingSummary::from_routed(&routed);
        assert_eq!((summary.tokens, summary.assignments, summary.capacity, summary.dropped), (3, 3, 2, 0));
        assert_eq!((summary.tokens_per_expert, summary.stats), (vec![2, 1], routed.stats));
    }

    /// Shared experts, numbered after the routed ones, take every token, each weighted by its own
    /// column of the shared gates.
    #[test]
    fn shared_experts_follow_the_routed_ones_with_every_token() {
        let spec = ModelSpec {
            d_model: 4,
            experts_per_layer: 3,
            top_k: 1,
            shared_experts: 2,
            shared_expert_gate: true,
            ..ModelSpec::default_synthetic()
        };
        let gate = Gate::synthetic(&spec, 0);
        let hidden: Vec<f32> = (0..3 * 4).map(|i| (i as f32 * 0.37).sin()).collect();
        let config = RoutingConfig { capacity: CapacityPolicy::Dropless, ..RoutingConfig::for_model(&spec) };
        let (logits, routing) = gate_and_route(&gate, &hidden, config);
        let routed = assign(&gate, &hidden, logits, routing, config);
        let shared_weights = gate.shared_weights(&hidden, 2);
        let shared: Vec<_> = routed.groups.iter().filter(|group| group.expert >= 3).collect();
        assert_eq!(shared.len(), 2);
        for (index, group) in shared.iter().enumerate() {
            assert_eq!((group.expert, group.tokens.clone()), (3 + index as u32, vec![0, 1, 2]));
            let column: Vec<f32> = (0..3).map(|token| shared_weights[token * 2 + index]).collect();
            assert_eq!(group.weights, column, "shared expert {index}'s gates");
        }
        let routed_only = assign(
            &gate,
            &hidden,
            routed.logits.clone(),
            routed.routing.clone(),
            RoutingConfig { shared_experts: 0, ..config },
        );
        assert!(routed_only.groups.iter().all(|group| group.expert < 3));
    }

    /// Soft MoE: each expert's group holds its slots' inputs `Dᵀ X` (D the dispatch weights,
    /// a softmax over tokens per slot), every slot counts as filled, and C is kept to combine.
    #[test]
    fn soft_moe_groups_hold_each_expert_s_slot_inputs() {
        let spec = ModelSpec { d_model: 4, experts_per_layer: 2, ..ModelSpec::default_synthetic() };
        let (tokens, slots, d_model) = (3, 2, 4);
        let gate = Gate::synthetic(&spec, 0);
        let hidden: Vec<f32> = (0..tokens * d_model).map(|i| (i as f32 * 0.61).cos()).collect();
        let config = RoutingConfig { policy: RoutingPolicy::SoftMoe { slots }, ..RoutingConfig::for_model(&spec) };
        let (logits, routing) = gate_and_route(&gate, &hidden, config);
        assert_eq!(logits, gate.slot_logits(&hidden, slots));
        let routed = assign(&gate, &hidden, logits.clone(), routing, config);
        let weights = soft::weights(&logits, tokens);
        assert_eq!(routed.soft_combine.as_deref(), Some(&weights.combine[..]));
        assert_eq!((routed.capacity.capacity, routed.capacity.tokens_per_expert.clone()), (2, vec![2, 2]));
        assert_eq!(routed.groups.len(), 2);
        for (expert, group) in routed.groups.iter().enumerate() {
            let rows = group.slots.as_ref().expect("slot rows");
            assert_eq!((group.expert, rows.first_slot), (expert as u32, expert * slots));
            for slot in 0..slots {
                let column = expert * slots + slot;
                for feature in 0..d_model {
                    let want: f32 = (0..tokens)
                        .map(|token| weights.dispatch[token * 2 * slots + column] * hidden[token * d_model + feature])
                        .sum();
                    let have = rows.inputs[slot * d_model + feature];
                    assert!((have - want).abs() < 1e-6, "expert {expert} slot {slot} [{feature}]: {have} vs {want}");
                }
            }
        }
    }

    /// Expert choice: each expert takes its capacity's worth of tokens, a dropless model an even
    /// share, even though every token would choose expert 0.
    #[test]
    fn under_expert_choice_each_expert_takes_its_capacity_of_tokens() {
        let spec = ModelSpec { d_model: 4, experts_per_layer: 2, ..ModelSpec::default_synthetic() };
        let gate = Gate::from_weights(vec![1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0], 2, 4);
        let hidden: Vec<f32> = (0..6 * 4).map(|i| if i % 4 == 0 { 1.0 + i as f32 } else { 0.0 }).collect();
        for (capacity, taken) in [(CapacityPolicy::Factor(0.5), 2), (CapacityPolicy::Dropless, 3)] {
            let config =
                RoutingConfig { policy: RoutingPolicy::ExpertChoice, capacity, ..RoutingConfig::for_model(&spec) };
            let (logits, routing) = gate_and_route(&gate, &hidden, config);
            let routed = assign(&gate, &hidden, logits, routing, config);
            assert_eq!(routed.capacity.tokens_per_expert, [taken, taken], "{capacity}");
            assert!(routed.groups.iter().all(|group| group.tokens.len() == taken as usize), "{capacity}");
        }
    }

    #[test]
    fn a_call_with_no_room_or_no_number_for_a_capacity_is_refused_naming_it() {
        let config = |capacity| RoutingConfig {
            policy: RoutingPolicy::TopK { k: 1, renormalize: true },
            overflow: OverflowPolicy::Drop,
            capacity,
            sequence_tokens: None,
            shared_experts: 0,
        };
        for factor in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let error = config(CapacityPolicy::Factor(factor)).check_call(8).expect_err("refused");
            assert!(matches!(error, ClientError::InvalidInput { field: "capacity_factor", .. }), "{factor}: {error}");
        }
        let error = config(CapacityPolicy::PerSequence(0)).check_call(8).expect_err("refused");
        assert_eq!(error.to_string(), "expert_capacity: must be positive");
        for fine in [CapacityPolicy::Factor(1.25), CapacityPolicy::PerSequence(4), CapacityPolicy::Dropless] {
            assert_eq!(config(fine).check_call(8), Ok(()), "{fine}");
        }
        let sequences = |sequence_tokens| RoutingConfig { sequence_tokens, ..config(CapacityPolicy::Dropless) };
        assert_eq!(
            sequences(Some(0)).check_call(8).expect_err("refused").to_string(),
            "sequence_tokens: must be positive"
        );
        assert_eq!(
            sequences(Some(3)).check_call(8).expect_err("refused").to_string(),
            "hidden: 8 tokens are not a whole number of sequences of 3 tokens"
        );
        assert_eq!(sequences(Some(4)).check_call(8), Ok(()));
    }

    #[test]
    fn a_call_off_the_model_s_layers_or_widths_is_refused_naming_it() {
        let model = ModelSpec { moe_layers: vec![1, 3], d_model: 4, ..ModelSpec::default_synthetic() };
        let refusal =
            |layer, values: usize| check_call(&model, layer, &vec![0.5; values]).expect_err("refused").to_string();
        assert_eq!(refusal(2, 8), "layer: 2 is not a MoE layer of synthetic; its MoE layers are [1, 3]");
        assert_eq!(refusal(1, 0), "hidden: 0 values is not a positive multiple of d_model 4");
        assert_eq!(refusal(3, 6), "hidden: 6 values is not a positive multiple of d_model 4");
        assert_eq!(check_call(&model, 3, &[0.5; 8]), Ok(()));
    }

    /// Token groups gather their tokens' rows and add `weight · row` back to them; Soft MoE's slot
    /// groups hand on their slot inputs and add every token's combine weight of each slot.
    #[test]
    fn groups_gather_their_rows_and_combine_their_outputs() {
        let hidden = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let tokens = ExpertAssignments { expert: 0, tokens: vec![0, 2], weights: vec![0.5, 2.0], slots: None };
        assert_eq!(tokens.rows(2), 2);
        let mut rows = Vec::new();
        tokens.input_rows(&hidden, 2, 0..2, &mut rows);
        tokens.input_rows(&hidden, 2, 1..2, &mut rows);
        assert_eq!(rows, [1.0, 2.0, 5.0, 6.0, 5.0, 6.0]);

        let slots = ExpertAssignments {
            expert: 1,
            tokens: Vec::new(),
            weights: Vec::new(),
            slots: Some(SlotRows { first_slot: 2, inputs: vec![7.0, 8.0, 9.0, 10.0] }),
        };
        assert_eq!(slots.rows(2), 2);
        let mut slot_rows = Vec::new();
        slots.input_rows(&hidden, 2, 1..2, &mut slot_rows);
        slots.input_rows(&hidden, 2, 0..1, &mut slot_rows);
        assert_eq!(slot_rows, [9.0, 10.0, 7.0, 8.0]);

        // Two tokens, two experts of two slots: C is [tokens, 4].
        let routing = Routing { tokens: 2, experts: 2, top_k: 0, choices: Vec::new(), probabilities: Vec::new() };
        let routed = Routed {
            logits: Vec::new(),
            routing,
            capacity: CapacityOutcome::default(),
            groups: Vec::new(),
            stats: RouterStats::default(),
            soft_combine: Some(vec![0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]),
        };
        let mut output = vec![1.0; 4];
        routed.combine_rows(&slots, 1..2, &[1.0, 10.0], 2, &mut output);
        assert_eq!(output, [1.5, 6.0, 2.0, 11.0], "each token's weight of expert 1's second slot (column 3)");
        let mut output = vec![0.0; 6];
        routed.combine_rows(&tokens, 0..2, &[1.0, 1.0, 2.0, 4.0], 2, &mut output);
        assert_eq!(output, [0.5, 0.5, 0.0, 0.0, 4.0, 8.0]);
    }
}
