//! What a load test found, as data: every figure computed once from the engine's tallies, then
//! rendered by [`crate::report`] as text, JSON or CSV, and read back from JSON by `--replot`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_router_client::ledger::LedgerRow;
use switchyard_router_client::timing::TimeBreakdown;

use super::{Arrival, LoadReport};

/// One load test's figures. Field names are the JSON keys and CSV columns, in this order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadSummary {
    pub target: String,
    /// `closed` or `open`.
    pub arrival: String,
    pub concurrency: usize,
    /// The open loop's Poisson rate.
    pub rate_calls_per_s: Option<f64>,
    pub tokens_per_call: usize,
    pub measured_s: f64,
    /// Until the window's last call ended; rates are over this.
    #[serde(default)]
    pub elapsed_s: f64,
    pub calls: u64,
    pub failed: u64,
    pub tokens_per_s: f64,
    pub calls_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p90_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_p999_ms: f64,
    pub latency_max_ms: f64,
    pub assignments: u64,
    pub dropped: u64,
    pub dropped_fraction: f64,
    pub rerouted: u64,
    /// Assignments full expert queues refused, overflowed by the client (`--on-refusal overflow`).
    #[serde(default)]
    pub refused: u64,
    pub imbalance: f64,
    pub switch_aux_loss: f64,
    pub importance_cv2: f64,
    pub z_loss: f64,
    pub message_bytes_sent_per_call: u64,
    pub payload_bytes_sent_per_call: u64,
    pub message_bytes_received_per_call: u64,
    pub payload_bytes_received_per_call: u64,
    pub wall_mean_ms: f64,
    #[serde(flatten)]
    pub phases: PhaseFigures,
    /// Failed calls by gRPC code.
    pub errors: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    /// Kept assignments per expert.
    pub expert_load: Vec<u64>,
    /// Rows each worker computed.
    pub worker_load: BTreeMap<String, u64>,
    pub ledger: Vec<LedgerRow>,
}

/// Mean and p99 of each phase of [`TimeBreakdown::PHASES`], in milliseconds per call.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PhaseFigures {
    pub gate_mean_ms: f64,
    pub gate_p99_ms: f64,
    pub plan_mean_ms: f64,
    pub plan_p99_ms: f64,
    pub encode_mean_ms: f64,
    pub encode_p99_ms: f64,
    pub network_mean_ms: f64,
    pub network_p99_ms: f64,
    pub queue_wait_mean_ms: f64,
    pub queue_wait_p99_ms: f64,
    pub compute_mean_ms: f64,
    pub compute_p99_ms: f64,
    pub decode_mean_ms: f64,
    pub decode_p99_ms: f64,
    pub combine_mean_ms: f64,
    pub combine_p99_ms: f64,
}

impl PhaseFigures {
    fn from_means_and_p99s(means: [f64; 8], p99s: [f64; 8]) -> Self {
        Self {
            gate_mean_ms: means[0],
            gate_p99_ms: p99s[0],
            plan_mean_ms: means[1],
            plan_p99_ms: p99s[1],
            encode_mean_ms: means[2],
            encode_p99_ms: p99s[2],
            network_mean_ms: means[3],
            network_p99_ms: p99s[3],
            queue_wait_mean_ms: means[4],
            queue_wait_p99_ms: p99s[4],
            compute_mean_ms: means[5],
            compute_p99_ms: p99s[5],
            decode_mean_ms: means[6],
            decode_p99_ms: p99s[6],
            combine_mean_ms: means[7],
            combine_p99_ms: p99s[7],
        }
    }

    /// `(phase, mean ms, p99 ms)` in [`TimeBreakdown::PHASES`] order.
    pub fn rows(&self) -> [(&'static str, f64, f64); 8] {
        let [gate, plan, encode, network, queue_wait, compute, decode, combine] = TimeBreakdown::PHASES;
        [
            (gate, self.gate_mean_ms, self.gate_p99_ms),
            (plan, self.plan_mean_ms, self.plan_p99_ms),
            (encode, self.encode_mean_ms, self.encode_p99_ms),
            (network, self.network_mean_ms, self.network_p99_ms),
            (queue_wait, self.queue_wait_mean_ms, self.queue_wait_p99_ms),
            (compute, self.compute_mean_ms, self.compute_p99_ms),
            (decode, self.decode_mean_ms, self.decode_p99_ms),
            (combine, self.combine_mean_ms, self.combine_p99_ms),
        ]
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

impl LoadReport {
    /// Every figure of this report, computed once.
    pub fn summary(&self) -> LoadSummary {
        let calls = self.calls.max(1);
        let (arrival, rate) = match self.arrival {
            Arrival::Closed => ("closed", None),
            Arrival::Open { rate } => ("open", Some(rate)),
        };
        let stats = self.mean_router_stats();
        let mean = self.mean_timing();
        let latency = |quantile: f64| ms(self.latency_at(quantile));
        let means = mean.phases().map(ms);
        let mut p99s = [0.0; 8];
        for (p99, histogram) in p99s.iter_mut().zip(&self.phase_histograms) {
            *p99 = ms(Duration::from_micros(histogram.value_at_quantile(0.99)));
        }
        LoadSummary {
            target: self.target.clone(),
            arrival: arrival.to_owned(),
            concurrency: self.concurrency,
            rate_calls_per_s: rate,
            tokens_per_call: self.tokens_per_call,
            measured_s: self.measured.as_secs_f64(),
            elapsed_s: self.elapsed.as_secs_f64(),
            calls: self.calls,
            failed: self.failed(),
            tokens_per_s: self.tokens_per_second(),
            calls_per_s: self.calls_per_second(),
            latency_p50_ms: latency(0.50),
            latency_p90_ms: latency(0.90),
            latency_p99_ms: latency(0.99),
            latency_p999_ms: latency(0.999),
            latency_max_ms: ms(Duration::from_micros(self.latency.max())),
            assignments: self.assignments,
            dropped: self.dropped,
            dropped_fraction: self.dropped as f64 / self.assignments.max(1) as f64,
            rerouted: self.rerouted,
            refused: self.refused,
            imbalance: f64::from(stats.imbalance),
            switch_aux_loss: f64::from(stats.switch_aux_loss),
            importance_cv2: f64::from(stats.importance_cv2),
            z_loss: f64::from(stats.z_loss),
            message_bytes_sent_per_call: self.bytes_total.message_sent / calls,
            payload_bytes_sent_per_call: self.bytes_total.payload_sent / calls,
            message_bytes_received_per_call: self.bytes_total.message_received / calls,
            payload_bytes_received_per_call: self.bytes_total.payload_received / calls,
            wall_mean_ms: ms(mean.wall),
            phases: PhaseFigures::from_means_and_p99s(means, p99s),
            errors: self.errors.iter().map(|(code, count)| (code.clone(), *count)).collect(),
            first_error: self.first_error.clone(),
            expert_load: self.expert_load.clone(),
            worker_load: self.ledger.rows_by_worker(),
            ledger: self.ledger.rows(),
        }
    }
}
