//! One expert feed-forward network on a tch device.
//!
//! Weights follow PyTorch's `nn.Linear` layout (`[out_features, in_features]`), which is also the
//! layout of most public checkpoints (the checkpoint reader converts the others), so `x · wᵀ + b`
//! is `F.linear(x, w, b)`. Each family's expert is an [`Activation`] variant, not a special case:
//! SwiGLU (Mixtral, Qwen, OLMoE, DeepSeek, Granite), GELU or ReLU two-matrix FFNs (Switch
//! Transformers), GPT-OSS's clamped SwiGLU with biases.

use tch::{Device, Kind, Tensor};

use switchyard_model::checkpoint::ExpertWeights;
use switchyard_model::synthetic::{self, WeightRole};
use switchyard_model::{Activation, HostTensor, ModelSpec, WeightDtype};

/// The tch kind of a weight dtype.
pub fn kind_of(dtype: WeightDtype) -> Kind {
    match dtype {
        WeightDtype::F32 => Kind::Float,
        WeightDtype::F16 => Kind::Half,
        WeightDtype::Bf16 => Kind::BFloat16,
    }
}

/// An expert's weights, resident on one device in one dtype, which is also the dtype it computes
/// in. `Send` but not `Sync` (like every tch tensor): it lives on the thread that computes with it.
#[derive(Debug)]
pub struct Expert {
    /// `None` for an identity expert (pure-communication measurements: same bytes back, no compute).
    ffn: Option<Ffn>,
    d_model: i64,
    device: Device,
    dtype: WeightDtype,
}

#[derive(Debug)]
pub(crate) struct Ffn {
    pub(crate) activation: Activation,
    /// `w1` (`[d_ff, d_model]`), with `w3` below it for the SwiGLU forms (`[2·d_ff, d_model]`):
    /// both input projections in one product, whose wider output fills more of a GPU's cores
    /// than two products of half its width when an expert has few rows.
    pub(crate) w_in: Tensor,
    /// `[d_model, d_ff]`.
    pub(crate) w2: Tensor,
    /// The biases of `w_in` (`b1`, then `b3`) and of `w2`, when the family has them.
    pub(crate) b_in: Option<Tensor>,
    pub(crate) b2: Option<Tensor>,
    pub(crate) d_ff: i64,
}

impl Ffn {
    /// The FFN of `activation` from its matrices as `nn.Linear` keeps them, already on their device
    /// in their dtype.
    fn new(activation: Activation, w1: Tensor, w2: Tensor, w3: Option<Tensor>, biases: Biases) -> Self {
        let Biases { b1, b2, b3 } = biases;
        let d_ff = w1.size()[0];
        let (w_in, b_in) = match w3 {
            None => (w1, b1),
            Some(w3) => {
                let w_in = Tensor::cat(&[w1, w3], 0);
                // A form with biases has both (GPT-OSS); one alone would be the other's zeros.
                let zeros = || Tensor::zeros([d_ff], (w_in.kind(), w_in.device()));
                let b_in = match (b1, b3) {
                    (None, None) => None,
                    (b1, b3) => Some(Tensor::cat(&[b1.unwrap_or_else(zeros), b3.unwrap_or_else(zeros)], 0)),
                };
                (w_in, b_in)
            }
        };
        Self { activation, w_in, w2, b_in, b2, d_ff }
    }
}

/// The hidden activations of an FFN of form `activation` from its input projection: `projected` is
/// `[rows, d_ff]`, or `[rows, 2·d_ff]` (gate, then up) for the SwiGLU forms.
pub(crate) fn hidden(activation: Activation, projected: &Tensor, d_ff: i64) -> Tensor {
    let gate_and_up = || (projected.narrow(-1, 0, d_ff), projected.narrow(-1, d_ff, d_ff));
    match activation {
        Activation::SwiGlu => {
            let (gate, up) = gate_and_up();
            gate.silu() * up
        }
        Activation::ClampedSwiGlu { alpha, limit } => {
            let (gate, up) = gate_and_up();
            let (alpha, limit) = (f64::from(alpha), f64::from(limit));
            let gate = gate.clamp_max(limit);
            let glu = &gate * (&gate * alpha).sigmoid();
            (up.clamp(-limit, limit) + 1.0) * glu
        }
        Activation::Relu => projected.relu(),
        Activation::Gelu => projected.gelu("none"),
    }
}

/// An FFN's optional biases: of `w1`, `w2` and `w3`.
struct Biases {
    b1: Option<Tensor>,
    b2: Option<Tensor>,
    b3: Option<Tensor>,
}

impl Expert {
    /// Builds expert `(layer, expert)` of `spec` from its seed, on `device`, in `dtype`.
    pub fn synthetic(spec: &ModelSpec, layer: u32, expert: u32, device: Device, dtype: WeightDtype) -> Self {
        let (d_model, d_ff) = (spec.d_model as usize, spec.d_ff_of(expert) as usize);
        let build = |role, rows, cols| {
            let values = synthetic::matrix(spec.seed, layer, expert, role, rows, cols);
            Tensor::from_slice(&values).view([rows as i64, cols as i64]).to_device(device).to_kind(kind_of(dtype))
        };
        let three_matrices = spec.activation.matrices() == 3;
        let biased = spec.expert_bias && !spec.is_shared(expert);
        let bias = |role, size: usize| build(role, 1, size).view([size as i64]);
        let ffn = Ffn::new(
            spec.activation,
            build(WeightRole::W1, d_ff, d_model),
            build(WeightRole::W2, d_model, d_ff),
            three_matrices.then(|| build(WeightRole::W3, d_ff, d_model)),
            Biases {
                b1: biased.then(|| bias(WeightRole::B1, d_ff)),
                b2: biased.then(|| bias(WeightRole::B2, d_model)),
                b3: (biased && three_matrices).then(|| bias(WeightRole::B3, d_ff)),
            },
        );
        Self { ffn: Some(ffn), d_model: d_model as i64, device, dtype }
    }

    /// An expert that answers with its input: dispatch and combine measured alone, as DeepEP's
    /// benchmarks do.
    pub fn identity(d_model: usize, device: Device) -> Self {
        Self { ffn: None, d_model: d_model as i64, device, dtype: WeightDtype::F32 }
    }

    /// Builds an expert of form `activation` from checkpoint weights (`nn.Linear` layout), on
    /// `device`, in `dtype` (`None`: the dtype the checkpoint stores, with no conversion at all).
    pub fn from_weights(
        weights: &ExpertWeights,
        activation: Activation,
        d_model: usize,
        d_ff: usize,
        device: Device,
        dtype: Option<WeightDtype>,
    ) -> Self {
        let dtype = dtype.unwrap_or(weights.w1.dtype);
        let build = |host: &HostTensor, shape: &[i64]| {
            Tensor::from_data_size(&host.bytes, shape, kind_of(host.dtype)).to_device(device).to_kind(kind_of(dtype))
        };
        let (d, f) = (d_model as i64, d_ff as i64);
        let biases = weights.biases.as_ref();
        debug_assert_eq!(
            weights.w3.is_some(),
            activation.matrices() == 3,
            "{activation} with w3: {}",
            weights.w3.is_some()
        );
        let ffn = Ffn::new(
            activation,
            build(&weights.w1, &[f, d]),
            build(&weights.w2, &[d, f]),
            weights.w3.as_ref().map(|w3| build(w3, &[f, d])),
            Biases {
                b1: biases.map(|b| build(&b.b1, &[f])),
                b2: biases.map(|b| build(&b.b2, &[d])),
                b3: biases.and_then(|b| b.b3.as_ref()).map(|b3| build(b3, &[f])),
            },
        );
        Self { ffn: Some(ffn), d_model: d_model as i64, device, dtype }
    }

    /// The dtype this expert's weights are resident in, and that it computes in.
    pub fn dtype(&self) -> WeightDtype {
        self.dtype
    }

    /// Bytes of weights this expert holds.
    pub fn resident_bytes(&self) -> u64 {
        self.parameters() * self.dtype.element_size() as u64
    }

    /// Weights (and biases) this expert holds; 0 for an identity expert.
    pub fn parameters(&self) -> u64 {
        let Some(ffn) = &self.ffn else {
            return 0;
        };
        [Some(&ffn.w_in), Some(&ffn.w2), ffn.b_in.as_ref(), ffn.b2.as_ref()]
            .into_iter()
            .flatten()
            .map(|tensor| tensor.numel() as u64)
            .sum()
    }

    pub fn d_model(&self) -> i64 {
        self.d_model
    }

    /// The FFN this expert computes; `None` for an identity expert.
    pub(crate) fn computed(&self) -> Option<&Ffn> {
        self.ffn.as_ref()
    }

    pub(crate) fn ffn_mut(&mut self) -> &mut Ffn {
        self.ffn.as_mut().expect("a computed expert")
    }

    /// Whether this expert answers with its input ([`Expert::identity`]).
    pub fn is_identity(&self) -> bool {
        self.ffn.is_none()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// `x [n, d_model]` (on this expert's device, any float kind) to `[n, d_model]` in this expert's
    /// dtype (an identity expert answers `x` itself).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let Some(ffn) = &self.ffn else {
            return x.shallow_clone();
        };
        let x = x.to_kind(kind_of(self.dtype));
        tch::no_grad(|| {
            let projected = x.linear(&ffn.w_in, ffn.b_in.as_ref());
            hidden(ffn.activation, &projected, ffn.d_ff).linear(&ffn.w2, ffn.b2.as_ref())
        })
    }

    /// Convenience for host-side callers: f32 rows in, f32 rows out.
    pub fn forward_f32(&self, rows: &[f32]) -> Vec<f32> {
        let tokens = rows.len() as i64 / self.d_model;
        let input = Tensor::from_slice(rows).view([tokens, self.d_model]).to_device(self.device);
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
        let expert = Expert::synthetic(&spec, 0, 1, Device::Cpu, WeightDtype::F32);
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
        assert_eq!(expert.resident_bytes(), spec.expert_bytes_of(1, WeightDtype::F32));
    }

    /// bf16 weights stay bf16 on the device: half the bytes, and a forward that agrees with the f32
    /// one to bf16's precision.
    #[test]
    fn a_bf16_expert_holds_half_the_bytes_and_agrees_with_f32_to_its_precision() {
        let spec = ModelSpec { d_model: 64, d_ff: 128, seed: 5, ..ModelSpec::default_synthetic() };
        let f32_expert = Expert::synthetic(&spec, 0, 2, Device::Cpu, WeightDtype::F32);
        let bf16_expert = Expert::synthetic(&spec, 0, 2, Device::Cpu, WeightDtype::Bf16);
        assert_eq!(bf16_expert.resident_bytes() * 2, f32_expert.resident_bytes());
        let x: Vec<f32> = (0..4 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        let (want, have) = (f32_expert.forward_f32(&x), bf16_expert.forward_f32(&x));
        let diff: f32 = want.iter().zip(&have).map(|(a, b)| (a - b) * (a - b)).sum();
        let norm: f32 = want.iter().map(|a| a * a).sum();
        let error = (diff / norm).sqrt();
        assert!(error > 0.0 && error < 2e-2, "bf16 relative error {error}");
    }

    #[test]
    fn an_identity_expert_answers_with_its_input_and_holds_nothing() {
        let expert = Expert::identity(4, Device::Cpu);
        assert_eq!(expert.forward_f32(&[1.0, -2.0, 3.5, 0.25]), [1.0, -2.0, 3.5, 0.25]);
        assert_eq!(expert.resident_bytes(), 0);
        assert!(expert.is_identity());
        assert!(!Expert::synthetic(&tiny_spec(Activation::SwiGlu), 0, 0, Device::Cpu, WeightDtype::F32).is_identity());
    }

    /// GPT-OSS's clamped SwiGLU with biases, written out by hand, against the tch forward: inputs
    /// large enough that both clamps act.
    #[test]
    fn clamped_swiglu_matches_gpt_oss_formula() {
        let (alpha, limit) = (1.702f32, 0.5f32);
        let (d, f) = (3usize, 2usize);
        let host = |values: &[f32], shape: &[usize]| HostTensor::from_f32(values, shape);
        let weights = ExpertWeights {
            w1: host(&[1.0, -0.5, 0.0, -1.0, 0.25, 2.0], &[f, d]),
            w2: host(&[0.5, -1.0, 1.5, 0.25, -0.75, 1.0], &[d, f]),
            w3: Some(host(&[-0.5, 1.0, 0.75, 2.0, -1.5, 0.5], &[f, d])),
            biases: Some(switchyard_model::checkpoint::ExpertBiases {
                b1: host(&[0.1, -0.2], &[f]),
                b2: host(&[0.05, 0.0, -0.05], &[d]),
                b3: Some(host(&[0.3, -0.1], &[f])),
            }),
        };
        let expert =
            Expert::from_weights(&weights, Activation::ClampedSwiGlu { alpha, limit }, d, f, Device::Cpu, None);
        let x = [1.0f32, -2.0, 0.5];
        let linear = |w: &[f32], b: &[f32], input: &[f32], outputs: usize| -> Vec<f32> {
            (0..outputs)
                .map(|o| b[o] + (0..input.len()).map(|i| w[o * input.len() + i] * input[i]).sum::<f32>())
                .collect()
        };
        let biases = weights.biases.as_ref().unwrap();
        let gate = linear(&weights.w1.to_f32(), &biases.b1.to_f32(), &x, f);
        let up = linear(&weights.w3.as_ref().unwrap().to_f32(), &biases.b3.as_ref().unwrap().to_f32(), &x, f);
        let hidden: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| {
                let g = g.min(limit);
                let u = u.clamp(-limit, limit);
                (u + 1.0) * g / (1.0 + (-alpha * g).exp())
            })
            .collect();
        let expected = linear(&weights.w2.to_f32(), &biases.b2.to_f32(), &hidden, d);
        assert!(gate.iter().any(|g| *g > limit) && up.iter().any(|u| u.abs() > limit), "both clamps act");
        let got = expert.forward_f32(&x);
        for (want, have) in expected.iter().zip(&got) {
            assert!((want - have).abs() < 1e-6, "{expected:?} vs {got:?}");
        }
        assert_eq!(expert.resident_bytes(), 4 * (3 * 6 + 2 + 3 + 2));
    }

    #[test]
    fn relu_expert_zeroes_negative_pre_activations() {
        let weights = ExpertWeights {
            w1: HostTensor::from_f32(&[1.0, -1.0], &[2, 1]),
            w2: HostTensor::from_f32(&[2.0, 3.0], &[1, 2]),
            w3: None,
            biases: None,
        };
        let expert = Expert::from_weights(&weights, Activation::Relu, 1, 2, Device::Cpu, None);
        // x = 1.5: pre-activations [1.5, -1.5] -> [1.5, 0] -> 2 * 1.5.
        assert_eq!(expert.forward_f32(&[1.5]), [3.0]);
        assert_eq!(expert.forward_f32(&[-1.0]), [3.0], "pre-activations [-1, 1] -> [0, 1] -> 3 * 1");
    }

    #[test]
    fn gelu_expert_has_two_matrices_and_keeps_shape() {
        let spec = tiny_spec(Activation::Gelu);
        let expert = Expert::synthetic(&spec, 0, 0, Device::Cpu, WeightDtype::F32);
        assert_eq!(expert.resident_bytes(), 2 * 4 * 6 * 4);
        assert_eq!(expert.forward_f32(&[1.0; 8]).len(), 8);
    }
}
