//! When calls start: a closed loop, or an open loop on a seeded Poisson schedule at a fixed rate
//! or one that ramps through stages (thinning).

use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};

/// How calls are started.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Arrival {
    /// `concurrency` callers, each starting its next call when the last one answered.
    #[default]
    Closed,
    /// Calls start on a seeded Poisson schedule at `rate` per second, whether or not earlier ones
    /// answered; latency counts from the scheduled start, so queueing is not hidden (no coordinated
    /// omission).
    Open { rate: f64 },
    /// As `Open`, at a rate that ramps through `stages` (k6's stages): it moves linearly from the
    /// previous stage's target (0 before the first) to each stage's target over its duration. The
    /// stages are the whole measured run: no warm-up.
    Ramp { stages: Arc<[Stage]> },
}

/// One stage of a ramp: the arrival rate reaches `target` calls per second at its end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    pub duration: Duration,
    pub target: f64,
}

/// The arrival rate `at` into `stages` (0 past the last).
pub fn ramp_rate(stages: &[Stage], at: Duration) -> f64 {
    let mut from = 0.0;
    let mut start = Duration::ZERO;
    for stage in stages {
        let end = start + stage.duration;
        if at < end {
            let progress = (at - start).as_secs_f64() / stage.duration.as_secs_f64().max(1e-9);
            return from + (stage.target - from) * progress;
        }
        (from, start) = (stage.target, end);
    }
    0.0
}

/// Calls the stages offer in all (the integral of their rate).
pub fn ramp_calls(stages: &[Stage]) -> f64 {
    let mut from = 0.0;
    let mut calls = 0.0;
    for stage in stages {
        calls += (from + stage.target) / 2.0 * stage.duration.as_secs_f64();
        from = stage.target;
    }
    calls
}

/// Offsets of a seeded Poisson process whose rate follows `stages`: arrivals at the stages' peak
/// rate, each kept with probability rate(t)/peak (thinning; Lewis and Shedler).
pub fn ramp_arrivals(stages: &[Stage], seed: u64) -> impl Iterator<Item = Duration> + use<> {
    let stages: Vec<Stage> = stages.to_vec();
    let peak = stages.iter().map(|stage| stage.target).fold(0.0, f64::max);
    let end: Duration = stages.iter().map(|stage| stage.duration).sum();
    let mut keep = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_0f7a_3e00_u64);
    (peak > 0.0)
        .then(|| poisson_arrivals(peak, seed))
        .into_iter()
        .flatten()
        .take_while(move |at| *at < end)
        .filter(move |at| keep.random_range(0.0..peak) < ramp_rate(&stages, *at))
}

/// Offsets from the start of a Poisson process of `rate` events per second (exponential gaps).
pub fn poisson_arrivals(rate: f64, seed: u64) -> impl Iterator<Item = Duration> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut at = 0.0f64;
    std::iter::from_fn(move || {
        let uniform: f64 = rng.random_range(f64::EPSILON..1.0);
        at += -uniform.ln() / rate;
        Some(Duration::from_secs_f64(at))
    })
}
