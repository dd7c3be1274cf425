//! One expert feed-forward network on a tch device.
//!
//! Weights follow PyTorch's `nn.Linear` layout (`[out_features, in_features]`), which is also the
//! layout of the public Mixtral and Qwen2-MoE checkpoints, so `x · wᵀ` is `F.linear(x, w)`.

use tch::{Device, Kind, Tensor};

use switchyard_model::checkpoint::ExpertMatrices;
use switchyard_model::synthetic::{self, WeightRole};
use switchyard_model::{Activation, ModelSpec};

/// An expert's weights, resident on one device. `Send` but not `Sync` (like every tch tensor): it
/// lives on the thread that computes with it.
#[derive(Debug)]
pub struct Expert {
    /// `None` for an identity expert (pure-communication measurements: same bytes back, no compute).
    ffn: Option<Ffn>,
    d_model: i64,
    device: Device,
}

#[derive(Debug)]
struct Ffn {
    activation: Activation,
    /// `[d_ff, d_model]`.
    w1: Tensor,
    /// `[d_model, d_ff]`.
    w2: Tensor,
    /// `[d_ff, d_model]`; SwiGLU only.
    w3: Option<Tensor>,
}

impl Expert {
    /// Builds expert `(layer, expert)` of `spec` from its seed, on `device`.
    pub fn synthetic(spec: &ModelSpec, layer: u32, expert: u32, device: Device) -> Self {
        let (d_model, d_ff) = (spec.d_model as usize, spec.d_ff_of(expert) as usize);
        let build = |role, rows, cols| {
            let values = synthetic::matrix(spec.seed, layer, expert, role, rows, cols);
            Tensor::from_slice(&values).view([rows as i64, cols as i64]).to_device(device)
        };
        let w1 = build(WeightRole::W1, d_ff, d_model);
        let w2 = build(WeightRole::W2, d_model, d_ff);
        let w3 = (spec.activation == Activation::SwiGlu).then(|| build(WeightRole::W3, d_ff, d_model));
        Self { ffn: Some(Ffn { activation: spec.activation, w1, w2, w3 }), d_model: d_model as i64, device }
    }

    /// An expert that answers with its input: dispatch and combine measured alone, as DeepEP's
    /// benchmarks do.
    pub fn identity(d_model: usize, device: Device) -> Self {
        Self { ffn: None, d_model: d_model as i64, device }
    }

    /// Builds an expert from checkpoint matrices (`nn.Linear` layout), on `device`.
    pub fn from_matrices(matrices: &ExpertMatrices, d_model: usize, d_ff: usize, device: Device) -> Self {
        let build = |values: &[f32], rows: usize, cols: usize| {
            Tensor::from_slice(values).view([rows as i64, cols as i64]).to_device(device)
        };
        let ffn = Ffn {
            activation: Activation::SwiGlu,
            w1: build(&matrices.w1, d_ff, d_model),
            w2: build(&matrices.w2, d_model, d_ff),
            w3: Some(build(&matrices.w3, d_ff, d_model)),
        };
        Self { ffn: Some(ffn), d_model: d_model as i64, device }
    }

    /// Bytes of weights this expert holds.
    pub fn resident_bytes(&self) -> u64 {
        let bytes = |tensor: &Tensor| (tensor.numel() * tensor.kind().elt_size_in_bytes()) as u64;
        self.ffn.as_ref().map_or(0, |ffn| bytes(&ffn.w1) + bytes(&ffn.w2) + ffn.w3.as_ref().map_or(0, bytes))
    }

    pub fn d_model(&self) -> i64 {
        self.d_model
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// `x [n, d_model]` (on this expert's device, f32) to `[n, d_model]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let Some(ffn) = &self.ffn else {
            return x.shallow_clone();
        };
        tch::no_grad(|| {
            let hidden = x.linear::<Tensor>(&ffn.w1, None);
            let hidden = match (&ffn.activation, &ffn.w3) {
                (Activation::SwiGlu, Some(w3)) => hidden.silu() * x.linear::<Tensor>(w3, None),
                _ => hidden.gelu("none"),
            };
            hidden.linear::<Tensor>(&ffn.w2, None)
        })
    }

    /// Convenience for host-side callers: f32 rows in, f32 rows out.
    pub fn forward_f32(&self, rows: &[f32]) -> Vec<f32> {
        let tokens = rows.len() as i64 / self.d_model;
        let input = Tensor::from_slice(rows).view([tokens, self.d_model]).to_device(self.device());
        let output = self.forward(&input).to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let mut values = vec![0.0; rows.len()];
        output.copy_data(&mut values, rows.len());
        values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_spec(activation: Activation) -> ModelSpec {
        ModelSpec { d_model: 4, d_ff: 6, activation, seed: 3, ..ModelSpec::default_synthetic() }
    }

    /// The SwiGLU formula written out by hand, element by element, against the tch forward.
    #[test]
    fn swiglu_matches_the_formula() {
        let spec = tiny_spec(Activation::SwiGlu);
        let expert = Expert::synthetic(&spec, 0, 1, Device::Cpu);
        let x = [0.5f32, -1.0, 2.0, 0.25];
        let w1 = synthetic::matrix(3, 0, 1, WeightRole::W1, 6, 4);
        let w2 = synthetic::matrix(3, 0, 1, WeightRole::W2, 4, 6);
        let w3 = synthetic::matrix(3, 0, 1, WeightRole::W3, 6, 4);
        let dot = |row: &[f32], v: &[f32]| row.iter().zip(v).map(|(a, b)| a * b).sum::<f32>();
        let hidden: Vec<f32> = (0..6)
            .map(|j| {
                let gate = dot(&w1[j * 4..j * 4 + 4], &x);
                let silu = gate / (1.0 + (-gate).exp());
                silu * dot(&w3[j * 4..j * 4 + 4], &x)
            })
            .collect();
        let expected: Vec<f32> = (0..4).map(|i| dot(&w2[i * 6..i * 6 + 6], &hidden)).collect();
        let got = expert.forward_f32(&x);
        for (want, have) in expected.iter().zip(&got) {
            assert!((want - have).abs() < 1e-6, "{expected:?} vs {got:?}");
        }
        assert_eq!(expert.resident_bytes(), spec.expert_bytes());
    }

    #[test]
    fn an_identity_expert_answers_with_its_input_and_holds_nothing() {
        let expert = Expert::identity(4, Device::Cpu);
        assert_eq!(expert.forward_f32(&[1.0, -2.0, 3.5, 0.25]), [1.0, -2.0, 3.5, 0.25]);
        assert_eq!(expert.resident_bytes(), 0);
    }

    #[test]
    fn gelu_expert_has_two_matrices_and_keeps_shape() {
        let spec = tiny_spec(Activation::Gelu);
        let expert = Expert::synthetic(&spec, 0, 0, Device::Cpu);
        assert_eq!(expert.resident_bytes(), 2 * 4 * 6 * 4);
        assert_eq!(expert.forward_f32(&[1.0; 8]).len(), 8);
    }
}
