//! Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").
//!
//! With slot logits `L = X · Φᵀ` (`[tokens, experts * slots]`): dispatch weights `D` are a softmax
//! over tokens (each slot column sums to one), combine weights `C` a softmax over slots (each token
//! row sums to one). Slot inputs are `X̃ = Dᵀ X`; expert e processes its `slots` rows of `X̃`; the
//! output is `Y = C · Ỹ`. No token is dropped and every expert gets exactly `slots` rows.

use super::{Routing, softmax_into};

/// Soft MoE's weights for one batch, both `[tokens, experts * slots]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftWeights {
    pub dispatch: Vec<f32>,
    pub combine: Vec<f32>,
}

pub fn weights(slot_logits: &[f32], tokens: usize) -> SoftWeights {
    let columns = slot_logits.len() / tokens;
    let mut combine = Vec::with_capacity(slot_logits.len());
    for row in slot_logits.chunks_exact(columns) {
        softmax_into(row, &mut combine);
    }
    let mut dispatch = vec![0.0f32; slot_logits.len()];
    let mut column = Vec::with_capacity(tokens);
    let mut normalised = Vec::with_capacity(tokens);
    for slot in 0..columns {
        column.clear();
        column.extend((0..tokens).map(|token| slot_logits[token * columns + slot]));
        normalised.clear();
        softmax_into(&column, &mut normalised);
        for (token, weight) in normalised.iter().enumerate() {
            dispatch[token * columns + slot] = *weight;
        }
    }
    SoftWeights { dispatch, combine }
}

/// Slot inputs `X̃ = Dᵀ X`, `[experts * slots, d_model]`.
pub fn slot_inputs(dispatch: &[f32], hidden: &[f32], d_model: usize) -> Vec<f32> {
    let tokens = hidden.len() / d_model;
    let columns = dispatch.len() / tokens;
    let mut inputs = vec![0.0f32; columns * d_model];
    for (token, row) in hidden.chunks_exact(d_model).enumerate() {
        for slot in 0..columns {
            let weight = dispatch[token * columns + slot];
            for (out, value) in inputs[slot * d_model..(slot + 1) * d_model].iter_mut().zip(row) {
                *out += weight * value;
            }
        }
    }
    inputs
}

/// The routing record of a soft batch: each token's probability of expert e is the combine mass of
/// e's slots in its output (for statistics); there are no discrete choices.
pub fn routing(combine: &[f32], tokens: usize, experts: usize) -> Routing {
    let slots = combine.len() / tokens / experts;
    let probabilities = combine.chunks_exact(slots).map(|expert_slots| expert_slots.iter().sum()).collect();
    Routing { tokens, experts, top_k: 0, choices: Vec::new(), probabilities }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_columns_and_combine_rows_sum_to_one() {
        let logits = [0.1f32, 2.0, -1.0, 0.5, 0.3, 0.0];
        let soft = weights(&logits, 3);
        for slot in 0..2 {
            let column: f32 = (0..3).map(|token| soft.dispatch[token * 2 + slot]).sum();
            assert!((column - 1.0).abs() < 1e-6);
        }
        for row in soft.combine.chunks_exact(2) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    /// Puigcerver et al.: D = softmax over tokens (each slot's column), C = softmax over slots
    /// (each token's row), of the same logits `[tokens, slots]`.
    #[test]
    fn dispatch_and_combine_are_the_papers_softmaxes_entry_by_entry() {
        let logits = [0.1f32, 2.0, -1.0, 0.5, 0.3, 0.0];
        let soft = weights(&logits, 3);
        let at = |token: usize, slot: usize| logits[token * 2 + slot].exp();
        for (token, slot) in (0..3).flat_map(|token| (0..2).map(move |slot| (token, slot))) {
            let dispatch = at(token, slot) / (0..3).map(|other| at(other, slot)).sum::<f32>();
            let combine = at(token, slot) / (0..2).map(|other| at(token, other)).sum::<f32>();
            assert!((soft.dispatch[token * 2 + slot] - dispatch).abs() < 1e-6, "D[{token}, {slot}]");
            assert!((soft.combine[token * 2 + slot] - combine).abs() < 1e-6, "C[{token}, {slot}]");
        }
    }

    #[test]
    fn each_slots_input_is_its_dispatch_column_times_the_tokens() {
        // Two tokens, three slots, d_model 2: X̃[s] = Σ_t D[t, s] x_t.
        let dispatch = [0.25f32, 1.0, 0.5, 0.75, 0.0, 0.5];
        let hidden = [2.0f32, 4.0, 6.0, 8.0];
        let inputs = slot_inputs(&dispatch, &hidden, 2);
        assert_eq!(inputs, [0.25 * 2.0 + 0.75 * 6.0, 0.25 * 4.0 + 0.75 * 8.0, 2.0, 4.0, 4.0, 6.0]);
    }

    #[test]
    fn a_tokens_probability_of_an_expert_is_the_combine_mass_of_its_slots() {
        // Two tokens, two experts of two slots each: each token's row of C is [e0 s0, e0 s1, e1 s0, e1 s1].
        let combine = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.25, 0.125, 0.125];
        let routing = routing(&combine, 2, 2);
        assert_eq!(routing.probabilities, [0.1 + 0.2, 0.3 + 0.4, 0.5 + 0.25, 0.125 + 0.125]);
        assert!(routing.choices.is_empty());
    }

    #[test]
    fn slot_inputs_are_dispatch_weighted_sums_of_tokens() {
        // Two tokens, one slot: equal logits give the mean of the tokens.
        let inputs = slot_inputs(&[0.5, 0.5], &[2.0, 4.0, 6.0, 8.0], 2);
        assert_eq!(inputs, [4.0, 6.0]);
    }
}
