//! The in-process reference layer: the same gate, routing and capacity as the distributed
//! [`switchyard_router_client::MoeClient`], the
//! same experts (rebuilt from the seed), no network. Tests compare the distributed output with it;
//! benchmarks use it as the baseline that expert parallelism's overhead is measured against.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use switchyard_experts::Expert;
use switchyard_model::ModelSpec;
use switchyard_model::checkpoint::{Checkpoint, CheckpointError};

use switchyard_router_client::error::ClientError;
use switchyard_router_client::gate::Gate;
use switchyard_router_client::router::{
    RoutingOverrides, RoutingSummary, assign, check_call, config_for_call, gate_and_route,
};
use switchyard_router_client::timing::TimeBreakdown;

/// The answer of one reference call.
#[derive(Debug, Clone)]
pub struct ReferenceOutput {
    pub hidden: Vec<f32>,
    pub router_logits: Vec<f32>,
    pub routing: RoutingSummary,
    /// Gate, plan (capacity, grouping), encode (gathering rows), compute, combine; no network.
    pub timing: TimeBreakdown,
}

/// `Sync`: experts (tch tensors, `Send` only) sit behind a mutex, so calls compute one at a time,
/// as one worker's compute thread does.
#[derive(Debug)]
pub struct ReferenceLayer {
    model: ModelSpec,
    gates: Vec<Gate>,
    experts: Mutex<HashMap<(u32, u32), Expert>>,
    /// libtorch threads of each forward, applied on the thread that runs it.
    threads: Option<i32>,
}

impl ReferenceLayer {
    /// Builds every expert of `layers` of a synthetic model on `device`.
    pub fn synthetic(model: &ModelSpec, layers: &[u32], device: tch::Device) -> Self {
        let _no_grad = tch::no_grad_guard();
        let gates = model.moe_layers.iter().map(|layer| Gate::synthetic(model, *layer)).collect();
        let per_layer = model.experts_per_layer + model.shared_experts;
        let experts = layers
            .iter()
            .flat_map(|layer| (0..per_layer).map(move |expert| (*layer, expert)))
            .map(|(layer, expert)| ((layer, expert), Expert::synthetic(model, layer, expert, device)))
            .collect();
        Self { model: model.clone(), gates, experts: Mutex::new(experts), threads: None }
    }

    /// The layer of a synthetic model with identity experts (each returns its input): the in-process
    /// counterpart of workers started with `--identity-experts`.
    pub fn identity(model: &ModelSpec, layers: &[u32], device: tch::Device) -> Self {
        let gates = model.moe_layers.iter().map(|layer| Gate::synthetic(model, *layer)).collect();
        let per_layer = model.experts_per_layer + model.shared_experts;
        let experts = layers
            .iter()
            .flat_map(|layer| (0..per_layer).map(move |expert| (*layer, expert)))
            .map(|key| (key, Expert::identity(model.d_model as usize, device)))
            .collect();
        Self { model: model.clone(), gates, experts: Mutex::new(experts), threads: None }
    }

    /// Builds `layers` (the checkpoint's MoE layer numbers) of a checkpoint, every expert, routed
    /// and shared, on `device`; routed with `model`, the checkpoint's spec with the operator's
    /// capacity policy.
    pub fn from_checkpoint(
        checkpoint: &Checkpoint,
        model: &ModelSpec,
        layers: &[u32],
        device: tch::Device,
    ) -> Result<Self, CheckpointError> {
        let _no_grad = tch::no_grad_guard();
        let gates =
            model.moe_layers.iter().map(|layer| Gate::from_checkpoint(checkpoint, *layer)).collect::<Result<_, _>>()?;
        let mut experts = HashMap::new();
        for layer in layers {
            for expert in 0..model.experts_per_layer + model.shared_experts {
                let weights = checkpoint.expert_weights(*layer, expert)?;
                let (d_model, d_ff) = (model.d_model as usize, model.d_ff_of(expert) as usize);
                experts
                    .insert((*layer, expert), Expert::from_weights(&weights, model.activation, d_model, d_ff, device));
            }
        }
        Ok(Self { model: model.clone(), gates, experts: Mutex::new(experts), threads: None })
    }

    /// The reference layer of `model`'s MoE layers `layers`: from its checkpoint, or seeded.
    pub fn for_model(model: &ModelSpec, layers: &[u32], device: tch::Device) -> Result<Self, CheckpointError> {
        match &model.checkpoint {
            Some(dir) => Self::from_checkpoint(&Checkpoint::open(std::path::Path::new(dir))?, model, layers, device),
            None => Ok(Self::synthetic(model, layers, device)),
        }
    }

    pub fn model(&self) -> &ModelSpec {
        &self.model
    }

    /// Computes with `threads` libtorch threads. The BLAS thread count is per OS thread, so it is
    /// set on whichever thread runs each forward; without this a forward on a fresh thread uses
    /// every core, whatever `tch::set_num_threads` said elsewhere.
    pub fn with_threads(mut self, threads: u32) -> Self {
        self.threads = Some(threads.max(1) as i32);
        self
    }

    /// Runs `hidden` through layer `layer`, routed as the model says with `overrides` applied.
    pub fn forward(
        &self,
        layer: u32,
        hidden: &[f32],
        overrides: &RoutingOverrides,
    ) -> Result<ReferenceOutput, ClientError> {
        if let Some(threads) = self.threads {
            tch::set_num_threads(threads);
        }
        let started = Instant::now();
        let d_model = self.model.d_model as usize;
        check_call(&self.model, layer, hidden)?;
        let gate = self
            .model
            .layer_index(layer)
            .map(|index| &self.gates[index])
            .ok_or(ClientError::InvalidInput { field: "layer", reason: format!("{layer} is not a MoE layer") })?;
        let config = config_for_call(&self.model, overrides);
        config.check_tokens(hidden.len() / d_model)?;
        let mut timing = TimeBreakdown::default();
        let phase = Instant::now();
        let (logits, routing) = gate_and_route(gate, hidden, config);
        timing.gate = phase.elapsed();
        let phase = Instant::now();
        let routed = assign(gate, hidden, logits, routing, config);
        timing.plan = phase.elapsed();
        let experts = self.experts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut output = vec![0.0f32; hidden.len()];
        let mut rows = Vec::new();
        for group in &routed.groups {
            let expert = experts.get(&(layer, group.expert)).ok_or(ClientError::InvalidInput {
                field: "layer",
                reason: format!("the reference layer holds no experts of layer {layer}"),
            })?;
            let phase = Instant::now();
            rows.clear();
            let group_rows = group.rows(d_model);
            group.input_rows(hidden, d_model, 0..group_rows, &mut rows);
            timing.encode += phase.elapsed();
            let phase = Instant::now();
            let expert_output = expert.forward_f32(&rows);
            timing.compute += phase.elapsed();
            let phase = Instant::now();
            routed.combine_rows(group, 0..group_rows, &expert_output, d_model, &mut output);
            timing.combine += phase.elapsed();
        }
        timing.wall = started.elapsed();
        Ok(ReferenceOutput {
            hidden: output,
            routing: RoutingSummary::from_routed(&routed),
            router_logits: routed.logits,
            timing,
        })
    }
}

/// `‖a − b‖_F / ‖b‖_F`: the numerical contract's measure.
pub fn relative_frobenius_error(actual: &[f32], expected: &[f32]) -> f64 {
    let (mut difference, mut norm) = (0.0f64, 0.0f64);
    for (a, b) in actual.iter().zip(expected) {
        difference += f64::from(a - b).powi(2);
        norm += f64::from(*b).powi(2);
    }
    (difference / norm.max(f64::MIN_POSITIVE)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_sums_weighted_expert_outputs() {
        let model = ModelSpec {
            d_model: 8,
            d_ff: 16,
            experts_per_layer: 4,
            top_k: 2,
            capacity: switchyard_model::CapacityPolicy::Dropless,
            ..ModelSpec::default_synthetic()
        };
        let reference = ReferenceLayer::synthetic(&model, &[0], tch::Device::Cpu);
        let hidden: Vec<f32> = (0..3 * 8).map(|i| (i as f32 * 0.3).cos()).collect();
        let output = reference.forward(0, &hidden, &RoutingOverrides::default()).expect("forward");
        assert_eq!(output.routing.dropped, 0);
        // Token 1 by hand: its two experts, each run alone, weighted.
        let config = switchyard_router_client::router::RoutingConfig::for_model(&model);
        let (_, routing) = gate_and_route(&Gate::synthetic(&model, 0), &hidden, config);
        let row = &hidden[8..16];
        let mut expected = vec![0.0f32; 8];
        for (expert, weight) in routing.token_choices(1) {
            let out = Expert::synthetic(&model, 0, *expert, tch::Device::Cpu).forward_f32(row);
            for (e, o) in expected.iter_mut().zip(out) {
                *e += weight * o;
            }
        }
        assert!(relative_frobenius_error(&output.hidden[8..16], &expected) < 1e-6);
        let error = reference.forward(3, &hidden, &RoutingOverrides::default()).unwrap_err().to_string();
        assert_eq!(error, "layer: 3 is not a MoE layer of synthetic; its MoE layers are [0]");
        assert!(
            reference
                .forward(0, &hidden[..5], &RoutingOverrides::default())
                .unwrap_err()
                .to_string()
                .starts_with("hidden")
        );
    }

    #[test]
    fn soft_moe_of_one_token_mixes_every_expert_by_its_slots_combine_mass() {
        let model = ModelSpec { d_model: 8, d_ff: 16, experts_per_layer: 4, ..ModelSpec::default_synthetic() };
        let reference = ReferenceLayer::synthetic(&model, &[0], tch::Device::Cpu);
        let x: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).sin()).collect();
        let soft = RoutingOverrides {
            policy: Some(switchyard_router_client::routing::RoutingPolicy::SoftMoe { slots: 2 }),
            ..Default::default()
        };
        let output = reference.forward(0, &x, &soft).expect("forward");
        // One token: each slot's input is the token itself; C is a softmax over all 8 slot logits.
        let logits = Gate::synthetic(&model, 0).slot_logits(&x, 2);
        let max = logits.iter().copied().fold(f32::MIN, f32::max);
        let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        let mut expected = vec![0.0f32; 8];
        for expert in 0..4u32 {
            let mass: f32 =
                logits[expert as usize * 2..expert as usize * 2 + 2].iter().map(|l| (l - max).exp() / total).sum();
            let out = Expert::synthetic(&model, 0, expert, tch::Device::Cpu).forward_f32(&x);
            for (e, o) in expected.iter_mut().zip(out) {
                *e += mass * o;
            }
        }
        assert!(relative_frobenius_error(&output.hidden, &expected) < 1e-5);
        assert_eq!(output.routing.dropped, 0);
    }
}
