//! What a bench run measured, as measured: each point's, preset's and step's load reports and
//! baselines, with the figures derived from them ([`super::summary`] turns these into the report's).

use std::time::Duration;

use switchyard_loadtest::loadtest::LoadReport;
use switchyard_loadtest::shaped_network::LinkRate;

use super::plan::{ClusterShape, Point, StepPlan};
use super::process_cpu::CpuPerCall;
use super::{cpu_time, peak, wake, wire};

/// One point, measured both ways.
#[derive(Debug, Clone)]
pub struct PointResult {
    pub point: Point,
    pub identity_experts: bool,
    /// Expert FLOPs of one kept row (2 per multiply-add), 0 for identity experts.
    pub flops_per_row: f64,
    pub distributed: LoadReport,
    pub reference: Option<LoadReport>,
    /// A raw TCP echo of one request's message bytes on this machine, measured in the same rounds
    /// as the calls: the floor of the network phase.
    pub tcp_round_trip: Option<wire::WireFigure>,
    /// A plain gRPC echo of the same bytes, in the same rounds: what tonic and h2 alone cost.
    pub grpc_round_trip: Option<wire::WireFigure>,
    /// Relative Frobenius error of one distributed call's output against the reference's (same input).
    pub wire_error: Option<f64>,
    /// The CPU time of a call, distributed and in-process, over the bench's and the cluster's
    /// processes.
    pub cpu_per_call: Option<CpuPerCall>,
    /// The device's matmul peak at one worker's thread count, and at the reference's, in GFLOP/s.
    pub worker_peak_gflops: Option<f64>,
    pub reference_peak_gflops: Option<f64>,
}

impl PointResult {
    fn mean_wall_ms(report: &LoadReport) -> f64 {
        report.mean_timing().wall.as_secs_f64() * 1e3
    }

    pub fn distributed_ms(&self) -> f64 {
        Self::mean_wall_ms(&self.distributed)
    }

    pub fn reference_ms(&self) -> Option<f64> {
        self.reference.as_ref().map(Self::mean_wall_ms)
    }

    /// Distributed mean call time over in-process mean call time.
    pub fn overhead_ratio(&self) -> Option<f64> {
        self.reference_ms().map(|reference| self.distributed_ms() / reference.max(1e-9))
    }

    /// Wire bytes (both directions) per token: tensor payload, encoded messages, socket bytes.
    pub fn bytes_per_token(&self) -> (f64, f64, f64) {
        let report = &self.distributed;
        let tokens = report.tokens.max(1) as f64;
        let bytes = report.bytes_total;
        let socket: u64 = report.ledger.pairs.values().map(|pair| pair.socket_sent + pair.socket_received).sum();
        (
            (bytes.payload_sent + bytes.payload_received) as f64 / tokens,
            (bytes.message_sent + bytes.message_received) as f64 / tokens,
            socket as f64 / tokens,
        )
    }

    /// Each phase's share of the mean wall time, in [`switchyard_router_client::TimeBreakdown::PHASES`] order.
    pub fn phase_shares(&self) -> Vec<f64> {
        let mean = self.distributed.mean_timing();
        let wall = mean.wall.as_secs_f64().max(1e-12);
        mean.phases().iter().map(|phase| phase.as_secs_f64() / wall).collect()
    }

    fn flops(report: &LoadReport, flops_per_row: f64) -> f64 {
        report.expert_load.iter().sum::<u64>() as f64 * flops_per_row
    }

    /// Expert GFLOP/s over the workers' compute time (None for identity experts).
    pub fn distributed_gflops(&self) -> Option<f64> {
        let compute: f64 = self.distributed.ledger.pairs.values().map(|pair| pair.compute.as_secs_f64()).sum();
        (self.flops_per_row > 0.0 && compute > 0.0)
            .then(|| Self::flops(&self.distributed, self.flops_per_row) / compute / 1e9)
    }

    /// Expert GFLOP/s of the in-process reference over its compute time.
    pub fn reference_gflops(&self) -> Option<f64> {
        let reference = self.reference.as_ref()?;
        let compute = reference.timing_total.compute.as_secs_f64();
        (self.flops_per_row > 0.0 && compute > 0.0).then(|| Self::flops(reference, self.flops_per_row) / compute / 1e9)
    }

    /// Expert compute as a share of the device's matmul peak: the workers' and the reference's.
    pub fn peak_shares(&self) -> (Option<f64>, Option<f64>) {
        let share = |gflops: Option<f64>, peak: Option<f64>| Some(gflops? / peak.filter(|peak| *peak > 0.0)?);
        (
            share(self.distributed_gflops(), self.worker_peak_gflops),
            share(self.reference_gflops(), self.reference_peak_gflops),
        )
    }

    /// Mean per call of the longest whole transfer of one worker's requests and of its answers (all
    /// its requests together, as its link carries them), in microseconds.
    pub fn transfer_span_us(&self) -> (f64, f64) {
        let calls = self.distributed.calls.max(1) as f64;
        (
            self.distributed.dispatch_span_total.as_secs_f64() * 1e6 / calls,
            self.distributed.combine_span_total.as_secs_f64() * 1e6 / calls,
        )
    }

    /// The `quantile` of the calls' dispatch and combine transfers (each the slowest worker's), in
    /// microseconds.
    pub fn transfer_quantile_us(&self, quantile: f64) -> (f64, f64) {
        let at = |histogram: &hdrhistogram::Histogram<u64>| histogram.value_at_quantile(quantile) as f64;
        (at(&self.distributed.dispatch_histogram), at(&self.distributed.combine_transfer_histogram))
    }

    /// Mean per call of the slowest worker's dispatch and combine transfers, in microseconds.
    pub fn transfer_us(&self) -> (f64, f64) {
        let calls = self.distributed.calls.max(1) as f64;
        (
            self.distributed.dispatch_total.as_secs_f64() * 1e6 / calls,
            self.distributed.combine_transfer_total.as_secs_f64() * 1e6 / calls,
        )
    }
}

/// A DeepEP setting: pure communication, bf16 both ways, beside the wire baselines.
#[derive(Debug, Clone)]
pub struct PresetResult {
    pub name: &'static str,
    pub result: PointResult,
    /// Baselines at the size of one dispatch request.
    pub baselines: wire::WireBaselines,
    /// The rate of each worker's link, when the workers sat behind shaped links, and raw TCP one
    /// way over one of those links with one request's bytes.
    pub link: Option<LinkRate>,
    pub link_tcp: Option<wire::WireFigure>,
    /// Raw TCP one way over every worker's link at once, each with the busiest worker's bytes
    /// of a call: what this client's machine moves to all its workers together at best.
    pub links_tcp_at_once: Option<wire::WireFigure>,
    /// On loopback, raw TCP to every worker at once, each connection carrying the busiest worker's
    /// bytes of a call, measured between the calls as the one-connection figure is: the same
    /// fan-out as a dispatch, with the TCP stack alone sharing the machine's cores.
    pub tcp_to_every_worker: Option<wire::WireFigure>,
    /// The same, each round right after every core was kept busy (spinning) as long as the round's
    /// calls' mean gate: the state a call's dispatch finds this machine in, its cores just busy
    /// with the gate and the workers idle through it.
    pub tcp_to_every_worker_after_gate: Option<wire::AfterBusyCores>,
    /// How busy every core of this machine was while the calls ran, the warm-up calls included and
    /// the baselines' time left out.
    pub cpu: Option<cpu_time::CpuShares>,
    /// FLOPs of the client's gate in one call (`2 · tokens · d_model · experts`).
    pub gate_flops: f64,
    /// The threads the client's gate used (its CPU threads, as many as the product is worth).
    pub gate_threads: usize,
    /// tch's f32 GEMM on as many CPU threads for the gate's own shape, measured in this run: the
    /// gate's yardstick.
    pub cpu_gemm_gflops: Option<f64>,
}

impl PresetResult {
    /// DeepEP's logical bytes of one call: every (token, expert) pair's row in bf16.
    pub fn logical_bytes_per_call(&self) -> f64 {
        let shape = self.result.point.shape;
        (self.result.point.tokens * shape.top_k as usize * shape.d_model as usize * 2) as f64
    }

    /// Rows the client sent per token, over every measured call.
    pub fn rows_per_token(&self) -> f64 {
        let report = &self.result.distributed;
        let rows: u64 = report.ledger.pairs.values().map(|pair| pair.rows).sum();
        rows as f64 / (report.calls.max(1) as f64 * self.result.point.tokens.max(1) as f64)
    }

    /// The client's gate GFLOP/s over its mean time per call.
    pub fn gate_gflops(&self) -> f64 {
        let gate = self.result.distributed.mean_timing().gate.as_secs_f64();
        self.gate_flops / gate.max(1e-12) / 1e9
    }

    /// Dispatch and combine, each as (microseconds, GB/s): the slowest worker's transfer per call
    /// and the call's payload bytes in that direction over it.
    pub fn transfers(&self) -> [(f64, f64); 2] {
        let report = &self.result.distributed;
        let calls = report.calls.max(1) as f64;
        let (dispatch_us, combine_us) = self.result.transfer_us();
        let rate = |bytes: u64, us: f64| bytes as f64 / calls / (us * 1e-6).max(1e-12) / 1e9;
        [
            (dispatch_us, rate(report.bytes_total.payload_sent, dispatch_us)),
            (combine_us, rate(report.bytes_total.payload_received, combine_us)),
        ]
    }

    /// The least time dispatch and combine can take on the links, in microseconds per call: the
    /// busiest worker's socket bytes each way per call over the link rate (TCP, IP and Ethernet
    /// headers come on top, so ~95% of the rate is the most a transfer reaches).
    pub fn link_floor_us(&self) -> Option<(f64, f64)> {
        let link = self.link?;
        let report = &self.result.distributed;
        let calls = report.calls.max(1) as f64;
        let busiest = |bytes: fn(&switchyard_router_client::ledger::PairTotals) -> u64| {
            report.ledger.pairs.values().map(bytes).max().unwrap_or(0) as f64 / calls
        };
        let floor_us = |bytes: f64| link.floor_seconds(bytes) * 1e6;
        Some((floor_us(busiest(|pair| pair.socket_sent)), floor_us(busiest(|pair| pair.socket_received))))
    }

    /// The client's whole dispatch (encode + transfer) and combine (transfer + decode + weighted sum),
    /// as DeepEP's kernels count them, in microseconds per call.
    pub fn end_to_end_us(&self) -> (f64, f64) {
        let mean = self.result.distributed.mean_timing();
        let (dispatch, combine) = self.result.transfer_us();
        let us = |duration: Duration| duration.as_secs_f64() * 1e6;
        (us(mean.encode) + dispatch, combine + us(mean.decode) + us(mean.combine))
    }
}

/// A whole-model step measured both ways, on loopback or on links of one rate.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub shape: ClusterShape,
    pub plan: StepPlan,
    pub link: Option<LinkRate>,
    pub distributed: LoadReport,
    pub reference: LoadReport,
}

/// Everything a bench run measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub settings_summary: serde_json::Value,
    pub points: Vec<PointResult>,
    pub presets: Vec<PresetResult>,
    pub steps: Vec<StepResult>,
    /// CPU, cores, CUDA: where the figures were measured.
    pub machine: String,
    /// How long a thread takes to wake another here, measured at the start of this run.
    pub thread_wake: Option<wake::WakeFigure>,
    /// The device's matmul peak in the experts' dtype, measured in this run.
    pub device_peaks: Vec<peak::DevicePeak>,
}

#[cfg(test)]
pub(crate) mod tests {
    use switchyard_loadtest::loadtest::LoadSpec;
    use switchyard_proto::wire::WireDtype;
    use switchyard_router_client::ledger::PairTotals;
    use switchyard_router_client::timing::{ByteCounts, TimeBreakdown};

    use super::wire::{AfterBusyCores, WireBaselines, WireFigure};

    use super::*;

    const CALLS: u64 = 4;
    const TOKENS: usize = 10;

    fn ms(millis: f64) -> Duration {
        Duration::from_secs_f64(millis * 1e-3)
    }

    /// A report of `CALLS` calls whose totals are given (the rest left empty).
    fn report(timing_total: TimeBreakdown, expert_load: Vec<u64>) -> LoadReport {
        let spec = LoadSpec::closed_loop(1, Duration::from_secs(1), TOKENS, CALLS, 0);
        LoadReport {
            calls: CALLS,
            tokens: CALLS * TOKENS as u64,
            expert_load,
            timing_total,
            ..LoadReport::empty("test", &spec)
        }
    }

    fn pair(rows: u64, socket_sent: u64, socket_received: u64, compute_ms: f64) -> PairTotals {
        PairTotals { rows, socket_sent, socket_received, compute: ms(compute_ms), ..PairTotals::default() }
    }

    /// [`point`]'s phases over its wall time, in the breakdown's order.
    pub(crate) const POINT_PHASE_SHARES: [f64; 8] = [0.1, 0.05, 0.05, 0.25, 0.05, 0.3, 0.025, 0.1];

    /// 4 calls of 10 tokens to 2 workers; every figure below is worked out by hand from these totals.
    pub(crate) fn point() -> PointResult {
        let timing_total = TimeBreakdown {
            gate: ms(0.8),
            plan: ms(0.4),
            encode: ms(0.4),
            network: ms(2.0),
            queue_wait: ms(0.4),
            compute: ms(2.4),
            decode: ms(0.2),
            combine: ms(0.8),
            wall: ms(8.0),
        };
        let mut distributed = report(timing_total, vec![10, 30, 40]);
        distributed.bytes_total =
            ByteCounts { payload_sent: 4000, payload_received: 2000, message_sent: 4400, message_received: 2200 };
        distributed.ledger.pairs.insert((0, "w1".into()), pair(50, 3000, 1000, 1.0));
        distributed.ledger.pairs.insert((0, "w2".into()), pair(30, 2000, 1400, 3.0));
        distributed.dispatch_total = ms(2.0);
        distributed.combine_transfer_total = ms(1.0);
        distributed.dispatch_span_total = ms(2.4);
        distributed.combine_span_total = ms(1.2);
        for micros in [100, 200, 300, 400] {
            distributed.dispatch_histogram.record(micros).unwrap();
            distributed.combine_transfer_histogram.record(micros / 2).unwrap();
        }
        PointResult {
            point: Point {
                shape: ClusterShape { workers: 2, experts: 8, top_k: 2, d_model: 4, d_ff: 8 },
                tokens: TOKENS,
                wire_dtype: WireDtype::F32,
            },
            identity_experts: false,
            flops_per_row: 1e6,
            distributed,
            reference: Some(report(
                TimeBreakdown { wall: ms(2.0), compute: ms(2.0), ..TimeBreakdown::default() },
                vec![80],
            )),
            tcp_round_trip: None,
            grpc_round_trip: None,
            wire_error: None,
            cpu_per_call: None,
            worker_peak_gflops: Some(40.0),
            reference_peak_gflops: Some(160.0),
        }
    }

    pub(crate) fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= 1e-9 * expected.abs().max(1.0)
    }

    #[test]
    fn a_points_figures_follow_from_its_totals() {
        let point = point();
        assert!(close(point.distributed_ms(), 2.0) && close(point.reference_ms().unwrap(), 0.5));
        assert!(close(point.overhead_ratio().unwrap(), 4.0));
        let (payload, message, socket) = point.bytes_per_token();
        assert!(close(payload, 6000.0 / 40.0) && close(message, 6600.0 / 40.0) && close(socket, 7400.0 / 40.0));
        let shares = point.phase_shares();
        assert_eq!(shares.len(), TimeBreakdown::PHASES.len());
        for (share, expected) in shares.iter().zip(POINT_PHASE_SHARES) {
            assert!(close(*share, expected), "{shares:?}");
        }
        // 80 kept rows of 1 MFLOP: over the workers' 4 ms of compute, over the reference's 2 ms.
        assert!(close(point.distributed_gflops().unwrap(), 20.0) && close(point.reference_gflops().unwrap(), 40.0));
        let (worker_share, reference_share) = point.peak_shares();
        assert!(close(worker_share.unwrap(), 0.5) && close(reference_share.unwrap(), 0.25));
        let (dispatch, combine) = point.transfer_us();
        assert!(close(dispatch, 500.0) && close(combine, 250.0));
        let (dispatch_span, combine_span) = point.transfer_span_us();
        assert!(close(dispatch_span, 600.0) && close(combine_span, 300.0));
        assert_eq!(point.transfer_quantile_us(0.5), (200.0, 100.0));
        assert_eq!(point.transfer_quantile_us(1.0), (400.0, 200.0));
    }

    #[test]
    fn identity_experts_and_missing_peaks_give_no_rates() {
        let identity = PointResult { flops_per_row: 0.0, worker_peak_gflops: None, ..point() };
        assert_eq!((identity.distributed_gflops(), identity.reference_gflops()), (None, None));
        let unmeasured = PointResult { worker_peak_gflops: Some(0.0), reference_peak_gflops: None, ..point() };
        assert_eq!(unmeasured.peak_shares(), (None, None));
        assert_eq!(PointResult { reference: None, ..point() }.overhead_ratio(), None);
        // No compute time measured (every call failed, say): no rate, rather than infinitely many.
        let mut uncomputed = point();
        uncomputed.distributed.ledger.pairs.values_mut().for_each(|pair| pair.compute = Duration::ZERO);
        uncomputed.reference.as_mut().unwrap().timing_total.compute = Duration::ZERO;
        assert_eq!((uncomputed.distributed_gflops(), uncomputed.reference_gflops()), (None, None));
    }

    /// [`point`] as a DeepEP preset's, its baselines all 1 GB/s, on links of 1 MB/s.
    pub(crate) fn preset() -> PresetResult {
        let figure = WireFigure { bytes: 1, repeats: 1, mean_us: 1.0, gb_per_s: 1.0 };
        PresetResult {
            name: "test",
            result: point(),
            baselines: WireBaselines {
                tcp_one_way: figure,
                tcp_echo: figure,
                grpc_one_way: figure,
                grpc_echo: figure,
                tcp_striped_one_way: None,
                tcp_connections: 0,
                grpc_one_way_uncopied: None,
            },
            // 1 MB/s: a byte a microsecond.
            link: Some(LinkRate::from_bits_per_second(8_000_000)),
            link_tcp: None,
            links_tcp_at_once: None,
            tcp_to_every_worker: None,
            tcp_to_every_worker_after_gate: None,
            cpu: None,
            gate_flops: 2e6,
            gate_threads: 1,
            cpu_gemm_gflops: None,
        }
    }

    /// [`preset`] beside baselines of its own: TCP on one connection at 4 MB/s, to every worker
    /// at once at 8 MB/s, and at 1 MB/s right after the cores were busy 100 µs.
    pub(crate) fn preset_beside_baselines() -> PresetResult {
        let mut preset = preset();
        preset.baselines.tcp_one_way.gb_per_s = 0.004;
        let to_every_worker = WireFigure { bytes: 1, repeats: 1, mean_us: 1.0, gb_per_s: 0.008 };
        preset.tcp_to_every_worker = Some(to_every_worker);
        preset.tcp_to_every_worker_after_gate =
            Some(AfterBusyCores { busy_us: 100.0, figure: WireFigure { gb_per_s: 0.001, ..to_every_worker } });
        preset
    }

    #[test]
    fn a_presets_figures_follow_from_its_totals() {
        let preset = preset();
        // DeepEP's count: 10 tokens x top-2 x 4 values x 2 bytes.
        assert!(close(preset.logical_bytes_per_call(), 160.0));
        assert!(close(preset.rows_per_token(), 80.0 / 40.0));
        // 2 MFLOP in the mean gate's 0.2 ms.
        assert!(close(preset.gate_gflops(), 10.0));
        // 1000 bytes a call out in 500 µs, 500 back in 250 µs: 2 MB/s each way.
        let [(dispatch_us, dispatch_rate), (combine_us, combine_rate)] = preset.transfers();
        assert!(close(dispatch_us, 500.0) && close(dispatch_rate, 0.002), "{dispatch_rate}");
        assert!(close(combine_us, 250.0) && close(combine_rate, 0.002), "{combine_rate}");
        // The busiest worker's socket bytes a call: 3000 / 4 out, 1400 / 4 back.
        let (dispatch_floor, combine_floor) = preset.link_floor_us().unwrap();
        assert!(close(dispatch_floor, 750.0) && close(combine_floor, 350.0));
        assert_eq!(PresetResult { link: None, ..preset.clone() }.link_floor_us(), None);
        // Encode (0.1 ms) before the dispatch; decode (0.05 ms) and sum (0.2 ms) after the combine.
        let (dispatch_end_to_end, combine_end_to_end) = preset.end_to_end_us();
        assert!(close(dispatch_end_to_end, 600.0) && close(combine_end_to_end, 500.0));
    }
}
