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
    /// `closed`, `open`, or `ramp` and its stages (`ramp 10s:100,30s:500`).
    pub arrival: String,
    pub concurrency: usize,
    /// The open loop's Poisson rate (a ramp's mean offered rate).
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
    #[serde(default)]
    pub latency_p95_ms: f64,
    #[serde(default)]
    pub latency_min_ms: f64,
    #[serde(default)]
    pub latency_mean_ms: f64,
    #[serde(default)]
    pub latency_stddev_ms: f64,
    /// Open loop: arrivals not started because `--max-in-flight` calls were out.
    #[serde(default)]
    pub dropped_arrivals: u64,
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
    /// Whole-model steps: the mean step split into communication, expert and client compute
    /// (none for single-layer calls, and in reports written before).
    #[serde(default)]
    pub step: Option<super::StepSplit>,
    /// Failed calls by gRPC code.
    pub errors: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    /// Kept assignments per expert.
    pub expert_load: Vec<u64>,
    /// Rows each worker computed.
    pub worker_load: BTreeMap<String, u64>,
    pub ledger: Vec<LedgerRow>,
    /// How the run was made: filled in by whoever ran it (the `switchyard` command records its
    /// command line, version, input seed and model).
    #[serde(default)]
    pub run: RunInfo,
}

/// What a report needs to be reproduced.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RunInfo {
    pub command_line: Vec<String>,
    pub version: String,
    pub input_seed: u64,
    pub model: String,
}

/// What a load test must meet to pass (`--max-error-rate`, `--max-p99`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Thresholds {
    /// Failed calls over all measured calls, at most.
    pub max_error_rate: Option<f64>,
    pub max_p99: Option<Duration>,
}

impl LoadSummary {
    /// Each threshold this run crossed, said in words; a run in which every call failed always
    /// fails (there is nothing to measure).
    pub fn crossed(&self, thresholds: Thresholds) -> Vec<String> {
        let mut crossed = Vec::new();
        let total = self.calls + self.failed;
        if self.calls == 0 && self.failed > 0 {
            crossed.push(format!("every call failed ({} of {total})", self.failed));
        }
        let error_rate = self.failed as f64 / total.max(1) as f64;
        if let Some(limit) = thresholds.max_error_rate.filter(|limit| error_rate > *limit) {
            crossed.push(format!(
                "error rate {error_rate:.4} ({} of {total} calls) above --max-error-rate {limit}",
                self.failed
            ));
        }
        if let Some(limit) = thresholds.max_p99.filter(|limit| self.calls > 0 && self.latency_p99_ms > ms(*limit)) {
            crossed.push(format!("p99 {:.3} ms above --max-p99 {:.3} ms", self.latency_p99_ms, ms(limit)));
        }
        crossed
    }
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
        let (arrival, rate) = match &self.arrival {
            Arrival::Closed => ("closed".to_owned(), None),
            Arrival::Open { rate } => ("open".to_owned(), Some(*rate)),
            Arrival::Ramp { stages } => {
                let total: Duration = stages.iter().map(|stage| stage.duration).sum();
                let mean = super::ramp_calls(stages) / total.as_secs_f64().max(1e-9);
                (format!("ramp {}", describe_stages(stages)), Some(mean))
            }
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
            arrival,
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
            latency_p95_ms: latency(0.95),
            latency_min_ms: if self.calls == 0 { 0.0 } else { ms(Duration::from_micros(self.latency.min())) },
            latency_mean_ms: self.latency.mean() / 1e3,
            latency_stddev_ms: self.latency.stdev() / 1e3,
            dropped_arrivals: self.dropped_arrivals,
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
            step: (self.layers_per_call > 1 || !self.attention_total.is_zero()).then(|| {
                super::StepSplit::of(
                    self.layers_per_call,
                    &mean,
                    self.attention_total / calls.min(u64::from(u32::MAX)) as u32,
                )
            }),
            errors: self.errors.iter().map(|(code, count)| (code.clone(), *count)).collect(),
            first_error: self.first_error.clone(),
            expert_load: self.expert_load.clone(),
            worker_load: self.ledger.rows_by_worker(),
            ledger: self.ledger.rows(),
            run: RunInfo::default(),
        }
    }
}

/// `10s:100,30s:500`, as `--stages` takes them.
pub fn describe_stages(stages: &[super::Stage]) -> String {
    let stage = |stage: &super::Stage| format!("{}:{}", humantime::format_duration(stage.duration), stage.target);
    stages.iter().map(stage).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(calls: u64, failed: u64, p99_ms: f64) -> LoadSummary {
        let mut json = serde_json::json!({
            "target": "t", "arrival": "closed", "concurrency": 1, "rate_calls_per_s": null, "tokens_per_call": 1,
            "measured_s": 1.0, "calls": calls, "failed": failed, "tokens_per_s": 0.0, "calls_per_s": 0.0,
            "latency_p50_ms": 1.0, "latency_p90_ms": 1.0, "latency_p99_ms": p99_ms, "latency_p999_ms": p99_ms,
            "latency_max_ms": p99_ms, "assignments": 0, "dropped": 0, "dropped_fraction": 0.0, "rerouted": 0,
            "imbalance": 1.0, "switch_aux_loss": 0.0, "importance_cv2": 0.0, "z_loss": 0.0,
            "message_bytes_sent_per_call": 0, "payload_bytes_sent_per_call": 0, "message_bytes_received_per_call": 0,
            "payload_bytes_received_per_call": 0, "wall_mean_ms": 1.0, "errors": {}, "first_error": null,
            "expert_load": [], "worker_load": {}, "ledger": []
        });
        let phases = serde_json::to_value(PhaseFigures::default()).expect("phases");
        if let (Some(object), Some(phases)) = (json.as_object_mut(), phases.as_object()) {
            object.extend(phases.clone());
        }
        serde_json::from_value(json).expect("a summary (older JSON without the newer fields reads too)")
    }

    #[test]
    fn thresholds_fail_the_run_and_say_why() {
        let none = Thresholds::default();
        assert!(summary(100, 0, 5.0).crossed(none).is_empty());
        assert_eq!(summary(0, 7, 0.0).crossed(none), ["every call failed (7 of 7)"]);
        let strict = Thresholds { max_error_rate: Some(0.01), max_p99: Some(Duration::from_millis(4)) };
        let crossed = summary(98, 2, 5.0).crossed(strict);
        assert_eq!(crossed.len(), 2, "{crossed:?}");
        assert!(crossed[0].starts_with("error rate 0.0200 (2 of 100 calls) above --max-error-rate 0.01"));
        assert_eq!(crossed[1], "p99 5.000 ms above --max-p99 4.000 ms");
        assert!(summary(1000, 1, 3.0).crossed(strict).is_empty(), "0.1% errors and a 3 ms p99 pass");
        assert!(summary(99, 1, 4.0).crossed(strict).is_empty(), "a run at its limits passes");
        assert!(summary(0, 0, 0.0).crossed(none).is_empty(), "a run of no calls failed none");
        let p99_only = Thresholds { max_p99: Some(Duration::from_millis(4)), ..none };
        assert_eq!(summary(0, 5, 9.0).crossed(p99_only), ["every call failed (5 of 5)"], "no latency without calls");
    }

    /// A report's figures: its totals per call, its latency in milliseconds, a ramp's mean offered
    /// rate, and a step's split only for whole-model steps.
    #[test]
    fn a_reports_figures_are_its_totals_per_call() {
        use std::sync::Arc;

        use switchyard_router_client::router::RoutingSummary;
        use switchyard_router_client::timing::ByteCounts;

        use super::super::target::CallOutcome;
        use super::super::{LoadSpec, Stage};

        let stages: Arc<[Stage]> = Arc::new([
            Stage { duration: Duration::from_secs(10), target: 100.0 },
            Stage { duration: Duration::from_secs(10), target: 100.0 },
        ]);
        let spec =
            LoadSpec { arrival: Arrival::Ramp { stages }, ..LoadSpec::closed_loop(1, Duration::from_secs(1), 8, 3, 1) };
        let call = |dropped: usize, payload: u64| CallOutcome {
            routing: RoutingSummary { tokens: 8, assignments: 16, dropped, ..RoutingSummary::default() },
            timing: TimeBreakdown {
                network: Duration::from_micros(payload),
                wall: Duration::from_micros(2 * payload),
                ..TimeBreakdown::default()
            },
            bytes: ByteCounts {
                payload_sent: payload,
                message_sent: 2 * payload,
                payload_received: 4 * payload,
                message_received: 3 * payload,
            },
            ..CallOutcome::default()
        };
        let mut report = LoadReport::empty("figures", &spec);
        report.record(Ok(call(2, 1_000)), Duration::from_millis(2));
        report.record(Ok(call(6, 3_000)), Duration::from_millis(4));
        let figures = report.summary();
        // 500 calls up the ramp and 1 000 at its top, over 20 s.
        assert_eq!((figures.arrival.as_str(), figures.rate_calls_per_s), ("ramp 10s:100,10s:100", Some(75.0)));
        assert_eq!(figures.dropped_fraction, 8.0 / 32.0);
        let per_call = (
            figures.payload_bytes_sent_per_call,
            figures.message_bytes_sent_per_call,
            figures.payload_bytes_received_per_call,
            figures.message_bytes_received_per_call,
        );
        assert_eq!(per_call, (2_000, 4_000, 8_000, 6_000));
        assert_eq!(
            (figures.wall_mean_ms, figures.phases.network_mean_ms, figures.phases.gate_mean_ms),
            (4.0, 2.0, 0.0)
        );
        let close = |value: f64, expected: f64| (value - expected).abs() < 0.01;
        assert!(close(figures.latency_min_ms, 2.0) && close(figures.latency_max_ms, 4.0), "{figures:?}");
        assert!(close(figures.latency_mean_ms, 3.0) && close(figures.latency_stddev_ms, 1.0), "{figures:?}");
        assert!(figures.step.is_none(), "a single layer's calls are not steps");
        report.layers_per_call = 2;
        assert!(report.summary().step.is_some(), "calls through two layers are");
        let none = LoadReport::empty("none", &spec).summary();
        assert_eq!((none.latency_min_ms, none.calls, none.dropped_fraction), (0.0, 0, 0.0));
    }

    #[test]
    fn phase_rows_name_each_phase_with_its_mean_and_p99() {
        let figures = PhaseFigures::from_means_and_p99s(
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
            [11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0],
        );
        let rows = figures.rows();
        assert_eq!(rows.map(|(phase, _, _)| phase), TimeBreakdown::PHASES);
        for (index, (_, mean, p99)) in rows.into_iter().enumerate() {
            assert_eq!((mean, p99), (index as f64 + 1.0, index as f64 + 11.0));
        }
        assert_eq!((figures.network_mean_ms, figures.compute_p99_ms), (4.0, 16.0));
    }
}
