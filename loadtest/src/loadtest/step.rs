//! Whole-model steps: one call runs the same tokens through every MoE layer of the model in
//! order, each after a stand-in for the attention block before it, as a serving system's decode
//! (or prefill) step does; each layer's input is the residual stream the layers before it wrote
//! ([`ResidualStream`]), so every layer routes what a model would hand it. Its time then splits into what expert parallelism costs
//! (communication), what the experts cost (compute, queueing), and what the client itself spends
//! (gate, encode, decode, combine, the stand-in): the time per output token a serving system sees.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use switchyard_router_client::timing::TimeBreakdown;

/// What stands in for the attention block before each MoE layer.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum AttentionStandIn {
    #[default]
    None,
    /// The client waits this long (an accelerator's attention kernel the client only waits on).
    Wait(Duration),
    /// The client computes `[tokens, d_model] × [d_model, width]` in f32 on its CPU (e.g. width
    /// 4·d_model for the Q, K, V and output projections).
    Gemm { width: usize },
}

impl AttentionStandIn {
    /// As the load test's report names it.
    pub fn describe(&self) -> String {
        match self {
            AttentionStandIn::None => "none".to_owned(),
            AttentionStandIn::Wait(wait) => format!("wait {}", humantime::format_duration(*wait)),
            AttentionStandIn::Gemm { width } => format!("f32 GEMM [tokens, d_model] x [d_model, {width}]"),
        }
    }
}

/// A whole-model step: `layers` in order, the stand-in before each.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelStep {
    pub layers: Vec<u32>,
    pub attention: AttentionStandIn,
}

/// The stand-in, ready to run: for a GEMM, its seeded weights, made once per load test.
#[derive(Debug, Clone)]
pub(crate) enum PreparedStandIn {
    None,
    Wait(Duration),
    Gemm(Arc<Array2<f32>>),
}

impl PreparedStandIn {
    pub(crate) fn new(stand_in: AttentionStandIn, d_model: usize) -> Self {
        match stand_in {
            AttentionStandIn::None => PreparedStandIn::None,
            AttentionStandIn::Wait(wait) => PreparedStandIn::Wait(wait),
            AttentionStandIn::Gemm { width } => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(0xa77e_0000);
                let scale = 1.0 / (d_model as f32).sqrt();
                let weights = Array2::from_shape_fn((d_model, width), |_| rng.random_range(-scale..scale));
                PreparedStandIn::Gemm(Arc::new(weights))
            }
        }
    }

    /// Runs once on `hidden` (`[tokens, d_model]`, row-major); the time it took. A GEMM runs on a
    /// blocking thread, never on the async runtime's.
    pub(crate) async fn run(&self, hidden: &Arc<Vec<f32>>) -> Duration {
        let started = Instant::now();
        match self {
            PreparedStandIn::None => return Duration::ZERO,
            PreparedStandIn::Wait(wait) => {
                // Tokio's timer counts whole milliseconds: a 200 µs attention would take 1 ms or
                // more. A blocking thread's sleep overshoots by tens of microseconds, idle.
                let wait = *wait;
                let _ = tokio::task::spawn_blocking(move || std::thread::sleep(wait)).await;
            }
            PreparedStandIn::Gemm(weights) => {
                let (weights, hidden) = (weights.clone(), hidden.clone());
                let product = tokio::task::spawn_blocking(move || product_sum(&hidden, &weights)).await;
                std::hint::black_box(product.ok());
            }
        }
        started.elapsed()
    }
}

/// The sum of `hidden · weights` (`[tokens, d_model] × [d_model, width]`): the stand-in's GEMM,
/// summed so that it is not optimised away.
fn product_sum(hidden: &[f32], weights: &Array2<f32>) -> f32 {
    let d_model = weights.nrows();
    let rows = ArrayView2::from_shape((hidden.len() / d_model.max(1), d_model), hidden);
    rows.map(|rows| rows.dot(weights).sum()).unwrap_or(0.0)
}

/// The residual stream of a whole-model step. Each layer's output is added to it, and the next
/// layer's input is the stream normalised per row to the RMS that row had in the step's first
/// input: a pre-norm transformer's RMSNorm before its MoE block (its learned gain aside), keeping
/// the gate's logits at the scale the load test's inputs were generated for.
pub(crate) struct ResidualStream {
    stream: Vec<f32>,
    d_model: usize,
    row_rms: Vec<f32>,
}

impl ResidualStream {
    /// Starts from the step's first input (`[tokens, d_model]`, row-major).
    pub(crate) fn new(first_input: &[f32], d_model: usize) -> Self {
        let d_model = d_model.max(1);
        let row_rms = first_input.chunks_exact(d_model).map(rms).collect();
        Self { stream: first_input.to_vec(), d_model, row_rms }
    }

    /// Adds a layer's `output` to the stream; the next layer's input.
    pub(crate) fn advance(&mut self, output: &[f32]) -> Vec<f32> {
        for (value, added) in self.stream.iter_mut().zip(output) {
            *value += added;
        }
        let mut next = self.stream.clone();
        for (row, target) in next.chunks_exact_mut(self.d_model).zip(&self.row_rms) {
            let current = rms(row);
            let gain = if current > 0.0 { target / current } else { 0.0 };
            row.iter_mut().for_each(|value| *value *= gain);
        }
        next
    }
}

fn rms(row: &[f32]) -> f32 {
    (row.iter().map(|value| value * value).sum::<f32>() / row.len().max(1) as f32).sqrt()
}

/// One step's (or the mean step's) time, split three ways.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct StepSplit {
    /// MoE layers per step.
    pub layers: usize,
    pub step_ms: f64,
    /// The wire: RPC time not spent in the workers.
    pub communication_ms: f64,
    /// The workers: expert compute, and queue wait and batching.
    pub expert_compute_ms: f64,
    /// The client: gate, planning, encode, decode, combine, and the attention stand-in.
    pub client_compute_ms: f64,
    /// Of which the attention stand-in.
    pub attention_ms: f64,
}

impl StepSplit {
    /// From the mean phases of a step (summed over its layers) and its mean stand-in time.
    pub fn of(layers: usize, mean: &TimeBreakdown, attention: Duration) -> Self {
        let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
        Self {
            layers,
            step_ms: ms(mean.wall + attention),
            communication_ms: ms(mean.network),
            expert_compute_ms: ms(mean.compute + mean.queue_wait),
            client_compute_ms: ms(mean.gate + mean.plan + mean.encode + mean.decode + mean.combine + attention),
            attention_ms: ms(attention),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_residual_stream_adds_each_output_and_feeds_rows_at_their_first_rms() {
        let first = [3.0f32, 4.0, 0.0, 1.0, 1.0, 1.0];
        let mut stream = ResidualStream::new(&first, 3);
        let next = stream.advance(&[3.0, 4.0, 0.0, 1.0, -1.0, 0.0]);
        // Row 0: [6, 8, 0] (RMS 10/√3) back to the first RMS 5/√3: [3, 4, 0]; row 1: [2, 0, 1]
        // (RMS √(5/3)) to RMS 1.
        let expected = [3.0, 4.0, 0.0, 2.0 / (5.0f32 / 3.0).sqrt(), 0.0, 1.0 / (5.0f32 / 3.0).sqrt()];
        for (value, expected) in next.iter().zip(expected) {
            assert!((value - expected).abs() < 1e-6, "{next:?}");
        }
        let again = stream.advance(&[0.0, 0.0, 6.0, 0.0, 0.0, 0.0]);
        // Row 0 is now [6, 8, 6], RMS √(136/3), scaled to 5/√3.
        assert!((again[2] - 30.0 / 136f32.sqrt()).abs() < 1e-5, "the stream keeps adding: {again:?}");
        assert_eq!(ResidualStream::new(&[0.0; 3], 3).advance(&[0.0; 3]), vec![0.0; 3], "a zero row stays zero");
    }

    #[tokio::test]
    async fn stand_ins_take_their_time_and_a_gemm_computes() {
        let hidden = Arc::new(vec![0.5f32; 4 * 8]);
        assert_eq!(PreparedStandIn::new(AttentionStandIn::None, 8).run(&hidden).await, Duration::ZERO);
        let waited = PreparedStandIn::new(AttentionStandIn::Wait(Duration::from_millis(20)), 8).run(&hidden).await;
        assert!(waited >= Duration::from_millis(20), "{waited:?}");
        let short = PreparedStandIn::new(AttentionStandIn::Wait(Duration::from_micros(200)), 8);
        let mut waits: Vec<Duration> = Vec::new();
        for _ in 0..20 {
            waits.push(short.run(&hidden).await);
        }
        waits.sort();
        assert!(waits[0] >= Duration::from_micros(200), "{waits:?}");
        assert!(waits[10] < Duration::from_micros(900), "not rounded up to the timer's millisecond: {waits:?}");
        let gemm = PreparedStandIn::new(AttentionStandIn::Gemm { width: 32 }, 8);
        let PreparedStandIn::Gemm(weights) = &gemm else { panic!("a GEMM stand-in") };
        assert_eq!(weights.dim(), (8, 32));
        assert!(gemm.run(&hidden).await > Duration::ZERO);
        // 4 tokens of 0.5 through [8, 32] weights: each weight counts 4 x 0.5 times.
        let want = 2.0 * weights.sum();
        assert!(want.abs() > 0.01, "seeded weights that do not sum to about zero: {want}");
        assert!((product_sum(&hidden, weights) - want).abs() < 1e-4 * want.abs().max(1.0));
        let names = [
            AttentionStandIn::None,
            AttentionStandIn::Wait(Duration::from_micros(200)),
            AttentionStandIn::Gemm { width: 32 },
        ]
        .map(|stand_in| stand_in.describe());
        assert_eq!(names, ["none", "wait 200us", "f32 GEMM [tokens, d_model] x [d_model, 32]"]);
    }

    #[test]
    fn a_step_splits_into_communication_experts_and_client() {
        let ms = Duration::from_millis;
        let mean = TimeBreakdown {
            gate: ms(1),
            plan: ms(1),
            encode: ms(2),
            network: ms(10),
            queue_wait: ms(3),
            compute: ms(20),
            decode: ms(1),
            combine: ms(1),
            wall: ms(39),
        };
        let split = StepSplit::of(32, &mean, ms(5));
        assert_eq!(split.layers, 32);
        assert!((split.step_ms - 44.0).abs() < 1e-9);
        assert!((split.communication_ms - 10.0).abs() < 1e-9);
        assert!((split.expert_compute_ms - 23.0).abs() < 1e-9);
        assert!((split.client_compute_ms - 11.0).abs() < 1e-9);
        assert!((split.attention_ms - 5.0).abs() < 1e-9);
    }
}
