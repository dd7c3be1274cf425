//! Seeded synthetic weights: a pure function of `(seed, layer, expert, matrix)`, independent of the
//! device, the process and the order of loading, so a worker and a client's reference layer build
//! bit-identical experts without ever exchanging weights.
//!
//! Values are uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in))`, PyTorch's `nn.Linear` initialisation
//! range, so activations keep their scale through the layer.

/// Which matrix of a layer a stream of values is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightRole {
    /// The router's `W_g [experts, d_model]`.
    Gate,
    /// `w1 [d_ff, d_model]`: the gated branch.
    W1,
    /// `w2 [d_model, d_ff]`: the down projection.
    W2,
    /// `w3 [d_ff, d_model]`: the linear branch of SwiGLU.
    W3,
    /// The noisy router's `W_noise [experts, d_model]`.
    GateNoise,
    /// The group-limited router's score-correction bias `[experts]`.
    GateBias,
    /// Soft MoE's slot parameters `Φ [experts * slots, d_model]`.
    SoftSlots,
    /// Shared experts' gates `[shared_experts, d_model]` (Qwen2-MoE's `shared_expert_gate`).
    SharedGate,
    /// Expert biases of w1, w2 and w3 (experts with biases, as GPT-OSS's).
    B1,
    B2,
    B3,
}

impl WeightRole {
    fn tag(self) -> u64 {
        match self {
            WeightRole::Gate => 0x6761_7465,
            WeightRole::W1 => 0x7731,
            WeightRole::W2 => 0x7732,
            WeightRole::W3 => 0x7733,
            WeightRole::GateNoise => 0x6e6f_6973,
            WeightRole::GateBias => 0x6269_6173,
            WeightRole::SoftSlots => 0x736c_6f74,
            WeightRole::SharedGate => 0x7368_6172,
            WeightRole::B1 => 0x6231,
            WeightRole::B2 => 0x6232,
            WeightRole::B3 => 0x6233,
        }
    }
}

/// SplitMix64: tiny, fast and well mixed; the stream is fully determined by its start state.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
}

/// SplitMix64's output function (Stafford's "Mix13"): a bijection of `u64` whose every output bit
/// depends on every input bit, for seeded values that are pure functions of their inputs.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn stream_start(seed: u64, layer: u32, expert: u32, role: WeightRole) -> u64 {
    let mut mixer = SplitMix64(seed);
    let mut state = mixer.next();
    for word in [u64::from(layer), u64::from(expert), role.tag()] {
        mixer.0 = state ^ word;
        state = mixer.next();
    }
    state
}

/// A row-major `[rows, cols]` matrix (`cols` is the fan-in) of seeded uniform values.
pub fn matrix(seed: u64, layer: u32, expert: u32, role: WeightRole, rows: usize, cols: usize) -> Vec<f32> {
    let bound = 1.0 / (cols as f32).sqrt();
    let mut generator = SplitMix64(stream_start(seed, layer, expert, role));
    (0..rows * cols)
        .map(|_| {
            // The top 24 bits give a uniform float in [0, 1) with every value exactly representable.
            let unit = (generator.next() >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
            (2.0 * unit - 1.0) * bound
        })
        .collect()
}

/// The router weights `W_g [experts, d_model]` of one layer.
pub fn gate_weights(seed: u64, layer: u32, experts: u32, d_model: u32) -> Vec<f32> {
    matrix(seed, layer, u32::MAX, WeightRole::Gate, experts as usize, d_model as usize)
}

/// The noisy router's `W_noise [experts, d_model]` of one layer.
pub fn gate_noise_weights(seed: u64, layer: u32, experts: u32, d_model: u32) -> Vec<f32> {
    matrix(seed, layer, u32::MAX, WeightRole::GateNoise, experts as usize, d_model as usize)
}

/// Soft MoE's slot parameters `Φ [experts * slots, d_model]` of one layer.
pub fn soft_slot_weights(seed: u64, layer: u32, experts: u32, slots: u32, d_model: u32) -> Vec<f32> {
    matrix(seed, layer, u32::MAX, WeightRole::SoftSlots, (experts * slots) as usize, d_model as usize)
}

/// The shared experts' gate weights `[shared_experts, d_model]` of one layer.
pub fn shared_gate_weights(seed: u64, layer: u32, shared_experts: u32, d_model: u32) -> Vec<f32> {
    matrix(seed, layer, u32::MAX, WeightRole::SharedGate, shared_experts as usize, d_model as usize)
}

/// A small score-correction bias `[experts]` in [-0.05, 0.05), as a trained DeepSeek-V3 router has.
pub fn gate_bias(seed: u64, layer: u32, experts: u32) -> Vec<f32> {
    // matrix() scales by 1/sqrt(cols): with cols = 400 the bound is 0.05.
    let unit = matrix(seed, layer, u32::MAX, WeightRole::GateBias, experts as usize, 400);
    unit.chunks_exact(400).map(|row| row[0]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first outputs of Vigna's `splitmix64.c` from state 0: synthetic weights stay the same
    /// across versions and can be rebuilt by any implementation of the published generator.
    #[test]
    fn splitmix64_is_the_published_generator() {
        let mut generator = SplitMix64(0);
        let outputs = [generator.next(), generator.next(), generator.next()];
        assert_eq!(outputs, [0xe220_a839_7b1d_cdaf, 0x6e78_9e6a_a1b9_65f4, 0x06c4_5d18_8009_454f]);
    }

    #[test]
    fn same_inputs_same_values_and_different_inputs_differ() {
        let a = matrix(7, 1, 2, WeightRole::W1, 4, 16);
        assert_eq!(a, matrix(7, 1, 2, WeightRole::W1, 4, 16));
        assert_ne!(a, matrix(8, 1, 2, WeightRole::W1, 4, 16));
        assert_ne!(a, matrix(7, 0, 2, WeightRole::W1, 4, 16));
        assert_ne!(a, matrix(7, 1, 3, WeightRole::W1, 4, 16));
        assert_ne!(a, matrix(7, 1, 2, WeightRole::W3, 4, 16));
        // Swapping layer and expert must not give the same stream.
        assert_ne!(matrix(7, 1, 2, WeightRole::W1, 4, 16), matrix(7, 2, 1, WeightRole::W1, 4, 16));
    }

    #[test]
    fn values_cover_the_init_range_with_zero_mean() {
        let values = matrix(0, 0, 0, WeightRole::W2, 256, 64);
        let bound = 1.0 / 8.0;
        assert!(values.iter().all(|v| (-bound..bound).contains(v)));
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        assert!(mean.abs() < 0.01 * bound, "mean {mean}");
        let max = values.iter().cloned().fold(f32::MIN, f32::max);
        assert!(max > 0.99 * bound, "max {max}");
    }
}
