//! Skewed load: inputs that make some experts hot, as real traffic does.
//!
//! Routing is the gate's choice, so skew is made through the inputs: each token of a generated batch
//! picks a target expert from the skew's distribution and is moved along that expert's gate row,
//! which raises that expert's logit by [`PULL`] times the row's norm.
//!
//! - [`Skew::Zipf`]: target expert e with probability ∝ 1/(e+1)^s (expert 0 hottest);
//! - [`Skew::HotExperts`]: every token pulled to one of these experts (one worker's, for "hot worker");
//! - [`Skew::Rotating`]: one hot expert at a time, moving to the next every `period`.

use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use switchyard_model::ModelSpec;
use switchyard_model::checkpoint::Checkpoint;

use switchyard_router_client::error::ClientError;

/// How far a token moves along its target expert's (normalised) gate row.
pub const PULL: f32 = 6.0;

#[derive(Debug, Clone, PartialEq, Default)]
pub enum Skew {
    #[default]
    Uniform,
    Zipf {
        exponent: f64,
    },
    HotExperts(Vec<u32>),
    Rotating {
        period: Duration,
    },
}

/// The batches a load test cycles through.
#[derive(Debug, Clone)]
pub struct Inputs {
    batches: Vec<Arc<Vec<f32>>>,
    /// For [`Skew::Rotating`]: batch e is hot on expert e, and the hot one changes every period.
    rotation: Option<Duration>,
}

impl Inputs {
    pub fn generate(skew: &Skew, gate: &[f32], experts: usize, tokens: usize, d_model: usize, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let rows: Vec<Vec<f32>> = gate
            .chunks_exact(d_model)
            .map(|row| {
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
                row.iter().map(|v| v / norm).collect()
            })
            .collect();
        let zipf: Vec<f64> = match skew {
            Skew::Zipf { exponent } => (0..experts).map(|e| 1.0 / ((e + 1) as f64).powf(*exponent)).collect(),
            _ => Vec::new(),
        };
        let zipf_total: f64 = zipf.iter().sum();
        let batch = |rng: &mut rand::rngs::StdRng, target: &mut dyn FnMut(&mut rand::rngs::StdRng) -> Option<usize>| {
            let mut values: Vec<f32> = (0..tokens * d_model).map(|_| rng.random_range(-1.7f32..1.7)).collect();
            for token in values.chunks_exact_mut(d_model) {
                if let Some(expert) = target(rng) {
                    for (value, direction) in token.iter_mut().zip(&rows[expert]) {
                        *value += PULL * direction;
                    }
                }
            }
            Arc::new(values)
        };
        let (batches, rotation) = match skew {
            Skew::Uniform => ((0..4).map(|_| batch(&mut rng, &mut |_| None)).collect(), None),
            Skew::Zipf { .. } => {
                let mut pick = |rng: &mut rand::rngs::StdRng| {
                    let mut draw = rng.random_range(0.0..zipf_total);
                    zipf.iter().position(|weight| {
                        draw -= weight;
                        draw < 0.0
                    })
                };
                ((0..4).map(|_| batch(&mut rng, &mut pick)).collect(), None)
            }
            Skew::HotExperts(hot) => {
                let mut pick =
                    |rng: &mut rand::rngs::StdRng| hot.get(rng.random_range(0..hot.len().max(1))).map(|e| *e as usize);
                ((0..4).map(|_| batch(&mut rng, &mut pick)).collect(), None)
            }
            Skew::Rotating { period } => {
                ((0..experts).map(|expert| batch(&mut rng, &mut |_| Some(expert))).collect(), Some(*period))
            }
        };
        Self { batches, rotation }
    }

    /// The batch for call `index`, `elapsed` after the test started.
    pub fn pick(&self, index: usize, elapsed: Duration) -> Arc<Vec<f32>> {
        let slot = match self.rotation {
            Some(period) => (elapsed.as_nanos() / period.as_nanos().max(1)) as usize,
            None => index,
        };
        self.batches[slot % self.batches.len()].clone()
    }
}

/// The gate rows `[experts, d_model]` of `layer` of `model` (seeded, or read from its checkpoint).
pub fn gate_rows(model: &ModelSpec, layer: u32) -> Result<Vec<f32>, ClientError> {
    match &model.checkpoint {
        None => {
            Ok(switchyard_model::synthetic::gate_weights(model.seed, layer, model.experts_per_layer, model.d_model))
        }
        Some(dir) => Checkpoint::open(std::path::Path::new(dir))
            .and_then(|checkpoint| checkpoint.gate_weights(layer))
            .map_err(|error| ClientError::Checkpoint { reason: error.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_router_client::gate::Gate;
    use switchyard_router_client::router::{RoutingConfig, gate_and_route};
    use switchyard_router_client::routing::RoutingPolicy;

    /// Share of tokens whose first choice is each expert.
    fn first_choice_shares(inputs: &Inputs, elapsed: Duration, model: &ModelSpec) -> Vec<f64> {
        let gate = Gate::synthetic(model, 0);
        let config = RoutingConfig {
            policy: RoutingPolicy::TopK { k: 1, renormalize: true },
            ..RoutingConfig::for_model(model)
        };
        let mut counts = vec![0usize; model.experts_per_layer as usize];
        for index in 0..4 {
            let (_, routing) = gate_and_route(&gate, &inputs.pick(index, elapsed), config);
            for (expert, _) in &routing.choices {
                counts[*expert as usize] += 1;
            }
        }
        let total: usize = counts.iter().sum();
        counts.iter().map(|count| *count as f64 / total as f64).collect()
    }

    fn model() -> ModelSpec {
        ModelSpec { d_model: 64, d_ff: 32, ..ModelSpec::default_synthetic() }
    }

    #[test]
    fn zipf_makes_the_first_experts_hot_and_uniform_does_not() {
        let model = model();
        let gate = gate_rows(&model, 0).expect("synthetic gate");
        let uniform =
            first_choice_shares(&Inputs::generate(&Skew::Uniform, &gate, 8, 256, 64, 1), Duration::ZERO, &model);
        let zipf = Inputs::generate(&Skew::Zipf { exponent: 1.5 }, &gate, 8, 256, 64, 1);
        let zipf = first_choice_shares(&zipf, Duration::ZERO, &model);
        assert!(uniform.iter().all(|share| *share < 0.3), "{uniform:?}");
        assert!(zipf[0] > 0.4 && zipf[0] > zipf[1] && zipf[1] > zipf[7], "{zipf:?}");
    }

    #[test]
    fn hot_experts_take_most_tokens_and_the_hotspot_rotates() {
        let model = model();
        let gate = gate_rows(&model, 0).expect("synthetic gate");
        let hot = first_choice_shares(
            &Inputs::generate(&Skew::HotExperts(vec![2, 5]), &gate, 8, 256, 64, 2),
            Duration::ZERO,
            &model,
        );
        assert!(hot[2] + hot[5] > 0.8, "{hot:?}");
        let rotating = Inputs::generate(&Skew::Rotating { period: Duration::from_secs(1) }, &gate, 8, 256, 64, 3);
        let at_start = first_choice_shares(&rotating, Duration::from_millis(500), &model);
        let later = first_choice_shares(&rotating, Duration::from_millis(3500), &model);
        assert!(at_start[0] > 0.8 && later[3] > 0.8, "{at_start:?} then {later:?}");
    }

    #[test]
    fn a_pulled_token_moves_pull_along_its_experts_unit_gate_row() {
        let model = model();
        let gate = gate_rows(&model, 0).expect("synthetic gate");
        // The first batch draws the same values under both skews (a rotation's targets are not
        // drawn), so they differ by the pull alone.
        let plain = Inputs::generate(&Skew::Uniform, &gate, 8, 4, 64, 5).pick(0, Duration::ZERO);
        let pulled = Inputs::generate(&Skew::Rotating { period: Duration::from_secs(1) }, &gate, 8, 4, 64, 5)
            .pick(0, Duration::ZERO);
        let row = &gate[..64];
        let row_norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        for (pulled_token, plain_token) in pulled.chunks_exact(64).zip(plain.chunks_exact(64)) {
            for ((after, before), direction) in pulled_token.iter().zip(plain_token).zip(row) {
                assert!((after - before - PULL * direction / row_norm).abs() < 1e-5, "{after} - {before}");
            }
        }
    }
}
