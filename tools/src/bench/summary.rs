//! What a bench run found, as data: each point's and preset's figures computed once from the
//! measurements, the whole written as `report.json` and read back from it (`--replot`), rendered by
//! [`crate::report`] as Markdown and SVG.

use serde::{Deserialize, Serialize};
use switchyard_router_client::timing::TimeBreakdown;

use super::cpu_time::CpuShares;
use super::peak::DevicePeak;
use super::plan::Point;
use super::process_cpu::CpuPerCall;
use super::wire::{AfterBusyCores, WireBaselines, WireFigure};
use super::{BenchReport, PointResult, PresetResult};
use switchyard_loadtest::loadtest::{LoadReport, LoadSummary, StepSplit};
use switchyard_loadtest::shaped_network::LinkRate;

/// A bench run's figures: `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchSummary {
    pub command: String,
    /// CPU, cores, CUDA: where the figures were measured.
    pub machine: String,
    /// How long a thread takes to wake another on that machine (none in reports written before it
    /// was measured).
    #[serde(default)]
    pub thread_wake: Option<super::wake::WakeFigure>,
    /// The device's matmul peak in the experts' dtype, measured in the same run (none in reports
    /// written before it was measured).
    #[serde(default)]
    pub device_peaks: Vec<DevicePeak>,
    pub settings: serde_json::Value,
    pub points: Vec<PointSummary>,
    pub presets: Vec<PresetSummary>,
    /// Whole-model steps (none in reports written before).
    #[serde(default)]
    pub steps: Vec<StepSummary>,
}

/// A whole-model step, distributed against in-process, each split into communication, expert
/// compute and client compute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSummary {
    pub shape: super::plan::ClusterShape,
    pub layers: usize,
    pub tokens: usize,
    pub attention: String,
    pub link_rate: Option<LinkRate>,
    pub distributed: StepSplit,
    pub reference: StepSplit,
    pub distributed_p99_ms: f64,
}

impl super::StepResult {
    pub fn summary(&self) -> StepSummary {
        let split = |report: &LoadReport| report.summary().step.unwrap_or_default();
        StepSummary {
            shape: self.shape,
            layers: self.plan.layers as usize,
            tokens: self.plan.tokens,
            attention: self.plan.attention.describe(),
            link_rate: self.link,
            distributed: split(&self.distributed),
            reference: split(&self.reference),
            distributed_p99_ms: self.distributed.summary().latency_p99_ms,
        }
    }
}

/// One point's figures, distributed against in-process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointSummary {
    pub point: Point,
    pub identity_experts: bool,
    pub distributed_mean_ms: f64,
    pub reference_mean_ms: Option<f64>,
    /// Distributed mean call time over in-process mean call time.
    pub overhead_ratio: Option<f64>,
    /// Wire bytes per token, both directions: tensor payload, encoded messages, socket bytes.
    pub payload_bytes_per_token: f64,
    pub message_bytes_per_token: f64,
    pub socket_bytes_per_token: f64,
    /// Each phase's share of the mean wall time.
    pub phase_shares: PhaseShares,
    /// Expert GFLOP/s over expert compute time (none for identity experts).
    pub distributed_expert_gflops: Option<f64>,
    pub reference_expert_gflops: Option<f64>,
    /// Those rates over the device's matmul peak at the same thread count, 0..1.
    #[serde(default)]
    pub distributed_peak_share: Option<f64>,
    #[serde(default)]
    pub reference_peak_share: Option<f64>,
    /// Relative Frobenius error of one distributed call against the reference's (same input).
    pub wire_error: Option<f64>,
    /// Mean per call of the slowest worker's dispatch and combine transfers, in microseconds.
    pub dispatch_transfer_us: f64,
    pub combine_transfer_us: f64,
    /// Mean time of a raw TCP echo of one request's message bytes, measured in turns with the calls
    /// (none in reports written before): what the network phase costs at least on this machine.
    #[serde(default)]
    pub tcp_round_trip_us: Option<f64>,
    /// Mean time of a plain gRPC echo of the same bytes, measured in the same turns (none in
    /// reports written before): what tonic and h2 alone cost per round trip here.
    #[serde(default)]
    pub grpc_round_trip_us: Option<f64>,
    /// The CPU time of a call, distributed and in-process, over the bench's and the cluster's
    /// processes (none in reports written before).
    #[serde(default)]
    pub cpu_per_call: Option<CpuPerCall>,
    pub distributed: LoadSummary,
    pub reference: Option<LoadSummary>,
}

/// Shares of the mean wall time, per phase of [`TimeBreakdown::PHASES`].
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PhaseShares {
    pub gate: f64,
    pub plan: f64,
    pub encode: f64,
    pub network: f64,
    pub queue_wait: f64,
    pub compute: f64,
    pub decode: f64,
    pub combine: f64,
}

impl PhaseShares {
    /// In [`TimeBreakdown::PHASES`] order.
    pub fn values(&self) -> [f64; 8] {
        [self.gate, self.plan, self.encode, self.network, self.queue_wait, self.compute, self.decode, self.combine]
    }

    fn from_values([gate, plan, encode, network, queue_wait, compute, decode, combine]: [f64; 8]) -> Self {
        Self { gate, plan, encode, network, queue_wait, compute, decode, combine }
    }
}

/// The median and 90th percentile of a set of times, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p90: f64,
}

/// A DeepEP setting's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresetSummary {
    pub preset: String,
    pub dispatch_transfer_us: f64,
    pub dispatch_gb_per_s: f64,
    pub combine_transfer_us: f64,
    pub combine_gb_per_s: f64,
    /// The client's encode plus the dispatch transfer, as DeepEP's kernels count dispatch.
    pub dispatch_with_encode_us: f64,
    /// The combine transfer plus decode and weighted sum.
    pub combine_with_decode_and_sum_us: f64,
    /// The median and 90th percentile over the calls of the dispatch and combine transfers (none
    /// in reports written before they were kept).
    #[serde(default)]
    pub dispatch_quantiles_us: Option<Quantiles>,
    #[serde(default)]
    pub combine_quantiles_us: Option<Quantiles>,
    /// The client's gate (`x · W_gᵀ` and top-k) in GFLOP/s, and as a share of tch's f32 GEMM of the
    /// same shape on as many CPU threads as the gate used, measured in the same run (none in
    /// reports written before).
    #[serde(default)]
    pub gate_gflops: f64,
    #[serde(default)]
    pub gate_share_of_gemm: Option<f64>,
    /// Threads of the gate and of its yardstick (1 in reports written before).
    #[serde(default = "one_thread")]
    pub gate_threads: usize,
    /// DeepEP's convention: tokens x top-k x bytes per token (bf16), per call, in MB; and GB/s of
    /// dispatch and combine counted in these bytes. Wire bytes (`dispatch_gb_per_s`) fall below
    /// them when a token travels once per worker rather than once per expert.
    #[serde(default)]
    pub logical_mb_per_call: f64,
    /// Rows sent per token: top-k when every assignment travels (expert-major), fewer when a
    /// token travels once per worker (token-major).
    #[serde(default)]
    pub rows_per_token: f64,
    #[serde(default)]
    pub logical_dispatch_gb_per_s: f64,
    #[serde(default)]
    pub logical_combine_gb_per_s: f64,
    /// Dispatch and combine wire GB/s over raw TCP's one-connection GB/s of the same run.
    #[serde(default)]
    pub dispatch_share_of_tcp: f64,
    #[serde(default)]
    pub combine_share_of_tcp: f64,
    /// On loopback, raw TCP to every worker at once with the busiest worker's bytes of a call
    /// each (the dispatch's fan-out, the TCP stack alone), and dispatch and combine wire GB/s over
    /// its GB/s (none on links, and in reports written before it was measured).
    #[serde(default)]
    pub tcp_to_every_worker: Option<WireFigure>,
    #[serde(default)]
    pub dispatch_share_of_tcp_to_every_worker: Option<f64>,
    #[serde(default)]
    pub combine_share_of_tcp_to_every_worker: Option<f64>,
    /// The same fan-out with every round right after every core was kept busy as long as the calls'
    /// mean gate (the state a dispatch finds the machine in), and dispatch wire GB/s over its GB/s
    /// (none on links, and in reports written before it was measured).
    #[serde(default)]
    pub tcp_to_every_worker_after_gate: Option<AfterBusyCores>,
    #[serde(default)]
    pub dispatch_share_of_tcp_to_every_worker_after_gate: Option<f64>,
    pub baselines: WireBaselines,
    /// Each worker's link rate (e.g. `10gbit`) when the workers sat behind shaped links, and the
    /// least time dispatch and combine could take on them: the busiest link's socket bytes per call
    /// over the rate, in microseconds (none on loopback, and in reports written before).
    #[serde(default)]
    pub link_rate: Option<LinkRate>,
    #[serde(default)]
    pub dispatch_floor_us: Option<f64>,
    #[serde(default)]
    pub combine_floor_us: Option<f64>,
    /// The longest whole transfer of one worker's requests, and of its answers, per call (all its
    /// requests together, as its link carries them), in microseconds.
    /// Raw TCP one way over one worker's link with one request's bytes (none on loopback).
    #[serde(default)]
    pub link_tcp: Option<WireFigure>,
    /// Raw TCP one way over every worker's link at once, each with the busiest worker's bytes of
    /// a call (none on loopback and in reports written before it was measured).
    #[serde(default)]
    pub links_tcp_at_once: Option<WireFigure>,
    /// How busy every core of the machine was while the calls ran (none before it was measured).
    #[serde(default)]
    pub cpu: Option<CpuShares>,
    #[serde(default)]
    pub dispatch_span_us: f64,
    #[serde(default)]
    pub combine_span_us: f64,
    pub result: PointSummary,
}

impl PresetSummary {
    /// The whole dispatch and combine transfers over the link's floor (1 is the wire's limit; 1.25
    /// is 80% of it).
    pub fn floor_ratios(&self) -> Option<(f64, f64)> {
        let ratio = |time: f64, floor: Option<f64>| Some(time / floor.filter(|floor| *floor > 0.0)?);
        Some((
            ratio(self.dispatch_span_us, self.dispatch_floor_us)?,
            ratio(self.combine_span_us, self.combine_floor_us)?,
        ))
    }
}

impl PointResult {
    pub fn summary(&self) -> PointSummary {
        let (payload, message, socket) = self.bytes_per_token();
        let (dispatch_us, combine_us) = self.transfer_us();
        let shares = self.phase_shares();
        let (distributed_peak_share, reference_peak_share) = self.peak_shares();
        let mut values = [0.0; 8];
        values.copy_from_slice(&shares[..TimeBreakdown::PHASES.len()]);
        PointSummary {
            point: self.point,
            identity_experts: self.identity_experts,
            distributed_mean_ms: self.distributed_ms(),
            reference_mean_ms: self.reference_ms(),
            overhead_ratio: self.overhead_ratio(),
            payload_bytes_per_token: payload,
            message_bytes_per_token: message,
            socket_bytes_per_token: socket,
            phase_shares: PhaseShares::from_values(values),
            distributed_expert_gflops: self.distributed_gflops(),
            reference_expert_gflops: self.reference_gflops(),
            distributed_peak_share,
            reference_peak_share,
            wire_error: self.wire_error,
            dispatch_transfer_us: dispatch_us,
            combine_transfer_us: combine_us,
            tcp_round_trip_us: self.tcp_round_trip.map(|echo| echo.mean_us),
            grpc_round_trip_us: self.grpc_round_trip.map(|echo| echo.mean_us),
            cpu_per_call: self.cpu_per_call,
            distributed: self.distributed.summary(),
            reference: self.reference.as_ref().map(|reference| reference.summary()),
        }
    }
}

impl PresetResult {
    pub fn summary(&self) -> PresetSummary {
        let [(dispatch_us, dispatch_gbps), (combine_us, combine_gbps)] = self.transfers();
        let (dispatch_total_us, combine_total_us) = self.end_to_end_us();
        let floors = self.link_floor_us();
        let (p50, p90) = (self.result.transfer_quantile_us(0.5), self.result.transfer_quantile_us(0.9));
        PresetSummary {
            preset: self.name.to_owned(),
            dispatch_transfer_us: dispatch_us,
            dispatch_gb_per_s: dispatch_gbps,
            combine_transfer_us: combine_us,
            combine_gb_per_s: combine_gbps,
            dispatch_with_encode_us: dispatch_total_us,
            combine_with_decode_and_sum_us: combine_total_us,
            dispatch_quantiles_us: Some(Quantiles { p50: p50.0, p90: p90.0 }),
            combine_quantiles_us: Some(Quantiles { p50: p50.1, p90: p90.1 }),
            gate_gflops: self.gate_gflops(),
            gate_share_of_gemm: self.cpu_gemm_gflops.map(|gemm| self.gate_gflops() / gemm.max(1e-12)),
            gate_threads: self.gate_threads,
            logical_mb_per_call: self.logical_bytes_per_call() / 1e6,
            rows_per_token: self.rows_per_token(),
            logical_dispatch_gb_per_s: self.logical_bytes_per_call() / (dispatch_us * 1e-6).max(1e-12) / 1e9,
            logical_combine_gb_per_s: self.logical_bytes_per_call() / (combine_us * 1e-6).max(1e-12) / 1e9,
            dispatch_share_of_tcp: dispatch_gbps / self.baselines.tcp_one_way.gb_per_s.max(1e-12),
            combine_share_of_tcp: combine_gbps / self.baselines.tcp_one_way.gb_per_s.max(1e-12),
            tcp_to_every_worker: self.tcp_to_every_worker,
            dispatch_share_of_tcp_to_every_worker: self
                .tcp_to_every_worker
                .map(|tcp| dispatch_gbps / tcp.gb_per_s.max(1e-12)),
            combine_share_of_tcp_to_every_worker: self
                .tcp_to_every_worker
                .map(|tcp| combine_gbps / tcp.gb_per_s.max(1e-12)),
            tcp_to_every_worker_after_gate: self.tcp_to_every_worker_after_gate,
            dispatch_share_of_tcp_to_every_worker_after_gate: self
                .tcp_to_every_worker_after_gate
                .map(|tcp| dispatch_gbps / tcp.figure.gb_per_s.max(1e-12)),
            baselines: self.baselines,
            link_rate: self.link,
            dispatch_floor_us: floors.map(|(dispatch, _)| dispatch),
            combine_floor_us: floors.map(|(_, combine)| combine),
            link_tcp: self.link_tcp,
            links_tcp_at_once: self.links_tcp_at_once,
            cpu: self.cpu,
            dispatch_span_us: self.result.transfer_span_us().0,
            combine_span_us: self.result.transfer_span_us().1,
            result: self.result.summary(),
        }
    }
}

impl BenchReport {
    /// The run's figures, with the `command` that produced them.
    pub fn summary(&self, command: &str) -> BenchSummary {
        BenchSummary {
            command: command.to_owned(),
            machine: self.machine.clone(),
            thread_wake: self.thread_wake,
            device_peaks: self.device_peaks.clone(),
            settings: self.settings_summary.clone(),
            points: self.points.iter().map(PointResult::summary).collect(),
            presets: self.presets.iter().map(PresetResult::summary).collect(),
            steps: self.steps.iter().map(super::StepResult::summary).collect(),
        }
    }
}

fn one_thread() -> usize {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report's headline ratios divide a preset's rates by the same run's baselines: one TCP
    /// connection, TCP to every worker at once (and right after the gate's busy cores), tch's GEMM.
    #[test]
    fn a_presets_shares_divide_its_rates_by_the_same_runs_baselines() {
        use crate::bench::results::tests::{POINT_PHASE_SHARES, close, preset_beside_baselines};
        // The fixture's dispatch and combine both move 2 MB/s (0.002 GB/s), its gate 10 GFLOP/s.
        let preset = PresetResult { cpu_gemm_gflops: Some(20.0), ..preset_beside_baselines() };
        let summary = preset.summary();
        assert!(close(summary.dispatch_share_of_tcp, 0.5) && close(summary.combine_share_of_tcp, 0.5));
        assert!(close(summary.dispatch_share_of_tcp_to_every_worker.unwrap(), 0.25));
        assert!(close(summary.combine_share_of_tcp_to_every_worker.unwrap(), 0.25));
        assert!(close(summary.dispatch_share_of_tcp_to_every_worker_after_gate.unwrap(), 2.0));
        assert!(close(summary.gate_share_of_gemm.unwrap(), 0.5));
        // DeepEP's 160 logical bytes a call, in 500 µs out and 250 µs back.
        assert!(close(summary.logical_mb_per_call, 160e-6));
        assert!(close(summary.logical_dispatch_gb_per_s, 0.00032) && close(summary.logical_combine_gb_per_s, 0.00064));
        assert_eq!(summary.dispatch_quantiles_us, Some(Quantiles { p50: 200.0, p90: 400.0 }));
        assert_eq!(summary.combine_quantiles_us, Some(Quantiles { p50: 100.0, p90: 200.0 }));
        assert!(close(summary.dispatch_floor_us.unwrap(), 750.0) && close(summary.combine_floor_us.unwrap(), 350.0));
        assert!(close(summary.dispatch_span_us, 600.0) && close(summary.combine_span_us, 300.0));
        let (dispatch_over_floor, combine_over_floor) = summary.floor_ratios().expect("a shaped link's floors");
        assert!(close(dispatch_over_floor, 0.8) && close(combine_over_floor, 300.0 / 350.0));
        assert!(close(summary.result.overhead_ratio.unwrap(), 4.0));
        let shares = summary.result.phase_shares.values();
        assert!(shares.iter().zip(POINT_PHASE_SHARES).all(|(share, expected)| close(*share, expected)), "{shares:?}");
        let unshaped = PresetSummary { dispatch_floor_us: Some(0.0), ..summary.clone() };
        assert_eq!(unshaped.floor_ratios(), None, "no floor, no ratio over it");
        let unmeasured = PresetResult { tcp_to_every_worker: None, cpu_gemm_gflops: None, ..preset }.summary();
        assert_eq!((unmeasured.dispatch_share_of_tcp_to_every_worker, unmeasured.gate_share_of_gemm), (None, None));
    }

    #[test]
    fn a_points_cpu_per_call_goes_into_its_summary() {
        use crate::bench::process_cpu::CpuPerCall;
        use crate::bench::results::tests::point;
        let cpu = CpuPerCall { distributed_us: 812.0, in_process_us: 604.0 };
        assert_eq!(PointResult { cpu_per_call: Some(cpu), ..point() }.summary().cpu_per_call, Some(cpu));
        assert_eq!(point().summary().cpu_per_call, None);
    }

    /// The report this repository publishes (docs/bench/sweep) reads back as the types that wrote
    /// it: `--replot` and the renderers work from files of earlier runs.
    #[test]
    fn the_published_report_reads_back() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench/sweep/report.json");
        let text = std::fs::read_to_string(&path).expect("docs/bench/sweep/report.json");
        let summary: BenchSummary = serde_json::from_str(&text).expect("it deserializes");
        assert!(!summary.points.is_empty() && !summary.presets.is_empty());
        let shares: f64 = summary.points[0].phase_shares.values().iter().sum();
        assert!((0.8..=1.01).contains(&shares), "phase shares add up to the wall: {shares}");
    }
}
