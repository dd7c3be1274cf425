//! The mean and quantiles of a set of timed repeats.

use std::time::Duration;

/// How a set of times is spread, in µs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
}

impl Spread {
    /// Of `times` (zero for none): the q-quantile is the time at index `len · q` when sorted.
    pub fn of(times: &[Duration]) -> Self {
        let mut sorted = times.to_vec();
        sorted.sort_unstable();
        let quantile = |q: f64| {
            let index = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
            sorted.get(index).copied().unwrap_or(Duration::ZERO).as_secs_f64() * 1e6
        };
        let mean_us = sorted.iter().sum::<Duration>().as_secs_f64() * 1e6 / sorted.len().max(1) as f64;
        Self { mean_us, p50_us: quantile(0.5), p90_us: quantile(0.9) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_mean_of_known_times() {
        let times: Vec<Duration> = (1..=10).rev().map(Duration::from_micros).collect();
        let spread = Spread::of(&times);
        assert_eq!((spread.mean_us, spread.p50_us, spread.p90_us), (5.5, 6.0, 10.0));
        assert_eq!(Spread::of(&[]), Spread { mean_us: 0.0, p50_us: 0.0, p90_us: 0.0 });
    }
}
