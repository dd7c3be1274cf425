//! `switchyard bench`: what expert parallelism costs, point by point.
//!
//! For each cluster shape ([`plan`]) the sweep starts a local coordinator and workers, then runs
//! every point (tokens per call × wire dtype) through the distributed layer and, in the same run,
//! through the in-process reference layer with the same inputs and routing: the communication
//! overhead is a ratio of two times measured minutes apart on one machine. The DeepEP presets
//! measure dispatch and combine alone (identity experts, bf16 both ways) beside this machine's raw
//! TCP and gRPC baselines ([`wire`]). [`summary`] holds the figures; [`crate::report`] renders them.

pub mod cpu_time;
pub mod peak;
pub mod plan;
pub mod spread;
pub mod summary;
pub mod wake;
pub mod wire;

pub use summary::{BenchSummary, PhaseShares, PointSummary, PresetSummary, Quantiles, StepSummary};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use switchyard_model::{CapacityPolicy, ModelSpec, WeightDtype};
use switchyard_proto::wire::WireDtype;

use plan::{ClusterShape, Point};
use switchyard_loadtest::loadtest::{self, AttentionStandIn, LoadReport, LoadSpec, ModelStep, Target};
use switchyard_loadtest::local_cluster::{Hosts, LocalCluster, LocalClusterConfig, LocalClusterError};
use switchyard_loadtest::shaped_network::{CongestionControl, LinkRate};
use switchyard_loadtest::skew::{Inputs, Skew, gate_rows};
use switchyard_reference::{ReferenceConfig, ReferenceError, ReferenceLayer, relative_frobenius_error};
use switchyard_router_client::client::{ClientOptions, MoeClient};
use switchyard_router_client::error::ClientError;
use switchyard_router_client::router::RoutingOverrides;
use switchyard_router_client::table::TableWatcher;
use switchyard_router_client::{DispatchLayout, gate};

/// How each point is measured.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    /// Measured calls per point (fewer if `point_time` runs out first).
    pub calls: u64,
    /// Unmeasured calls before each point's measured ones.
    pub warmup_calls: u64,
    /// Most measured time per point and target.
    pub point_time: Duration,
    /// Closed-loop callers. 1 keeps every call's ledger exact (no two calls share a socket or a batch).
    pub concurrency: usize,
    /// Workers answer with their input: no compute, the same bytes back.
    pub identity_experts: bool,
    /// With identity experts, how long each step holds the compute thread (workers' and the
    /// reference's alike): a stand-in for compute time without compute.
    pub identity_hold: Duration,
    pub worker_torch_threads: u32,
    /// The dtype experts compute in, on the workers and in the reference alike; `None`: the
    /// device's default (bf16 on CUDA, f32 on CPU).
    pub compute_dtype: Option<WeightDtype>,
    pub batch_wait_us: u64,
    pub capacity_factor: f32,
    pub dispatch: DispatchLayout,
    pub connections_per_worker: usize,
    /// Whether large payloads go as streams of chunks ([`ClientOptions::chunked_dispatch`]).
    pub chunked_dispatch: bool,
    /// Model fields the sweep does not vary (activation, seed).
    pub model: ModelSpec,
    /// Repeats of each wire baseline.
    pub baseline_repeats: u32,
    pub coordinator_bin: PathBuf,
    pub worker_bin: PathBuf,
    /// Loopback, or each worker on a host of its own behind a shaped link.
    pub hosts: Hosts,
    /// A development CA: the clusters run on mutual TLS ([`LocalClusterConfig::dev_tls`]).
    pub dev_tls: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Cluster(#[from] LocalClusterError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("wire baseline: {0}")]
    Wire(#[from] std::io::Error),
    #[error("model: {0}")]
    Model(#[from] switchyard_model::SpecError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
}

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

/// Round trips of the thread wake measurement: about half a second where a wake costs 100 µs.
const WAKE_ROUND_TRIPS: u32 = 2000;

/// Rounds a point's or preset's calls are measured in: this machine's loopback and scheduler swing
/// several-fold within seconds, so what is compared (distributed, in-process, raw TCP) takes turns.
const MEASURE_ROUNDS: u64 = 5;

/// The presets' workers' batch wait unless they overlap: a step waits only while another request
/// is on its way in, so with a bound no call's dispatch outlasts, each worker computes once a
/// call's whole dispatch is in, as DeepEP's normal kernels do (dispatch, then experts, then
/// combine), and dispatch and combine are timed each alone, as DeepEP's tests time them. On a
/// machine short of cores an overlapped step shares them with the transfers still running (on
/// this project's 2-core machine, DeepEP-normal at 10 Gbit/s: 60-63% of the line rate overlapped,
/// 80-89% alone).
pub const WHOLE_DISPATCH_WAIT: Duration = Duration::from_secs(10);

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

/// DeepEP's published settings: hidden 7168, top-8 of 256 experts (DeepSeek-V3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// 4096 tokens per call (the normal, throughput-oriented kernels).
    DeepEpNormal,
    /// 128 tokens per call (the low-latency decoding kernels).
    DeepEpLowLatency,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::DeepEpNormal => "deepep-normal",
            Preset::DeepEpLowLatency => "deepep-low-latency",
        }
    }

    pub fn tokens(self) -> usize {
        match self {
            Preset::DeepEpNormal => 4096,
            Preset::DeepEpLowLatency => 128,
        }
    }

    /// The cluster: identity experts need no real d_ff; capacity never drops (DeepEP does not).
    pub fn shape(self, workers: usize) -> ClusterShape {
        ClusterShape { workers, experts: 256, top_k: 8, d_model: 7168, d_ff: 64 }
    }
}

/// A whole-model step: a synthetic model of `layers` MoE layers of the sweep's first shape, each
/// call `tokens` through all of them in order with `attention` before each.
#[derive(Debug, Clone, Copy)]
pub struct StepPlan {
    pub layers: u32,
    pub tokens: usize,
    pub attention: AttentionStandIn,
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

/// What `run` measures.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    pub axes: plan::Axes,
    pub grid: bool,
    /// Skip the sweep (presets only).
    pub sweep: bool,
    pub presets: Vec<Preset>,
    pub preset_workers: usize,
    /// Measured calls of each preset, and the most time they may take (a DeepEP-normal call moves
    /// ~470 MB each way: seconds, not milliseconds, on one CPU host).
    pub preset_calls: u64,
    pub preset_time: Duration,
    /// Whether the presets' workers start on each request of a call as it arrives, the rest of the
    /// dispatch still on the wire; otherwise each waits for its whole dispatch
    /// ([`WHOLE_DISPATCH_WAIT`]).
    pub preset_overlap: bool,
    /// Run the presets (and the step) once per rate, the workers behind links of that rate;
    /// empty: on loopback.
    pub link_rates: Vec<LinkRate>,
    /// Every host's TCP congestion control on the links.
    pub link_congestion: CongestionControl,
    /// A whole-model step to measure, if any.
    pub step: Option<StepPlan>,
}

impl BenchPlan {
    /// Where a run on `link` puts the cluster: each worker behind a link of that rate, every host
    /// running the plan's congestion control; without a link, `otherwise`.
    fn hosts_behind(&self, link: Option<LinkRate>, otherwise: Hosts) -> Hosts {
        link.map_or(otherwise, |rate| Hosts::Namespaces { worker_link: Some(rate), congestion: self.link_congestion })
    }
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

fn model_of(shape: ClusterShape, settings: &BenchSettings, capacity: CapacityPolicy) -> Result<ModelSpec, BenchError> {
    let model = ModelSpec {
        moe_layers: vec![0],
        experts_per_layer: shape.experts,
        d_model: shape.d_model,
        d_ff: shape.d_ff,
        top_k: shape.top_k,
        capacity,
        ..settings.model.clone()
    };
    Ok(model.validate()?)
}

/// A running local cluster of one shape, with a routing-table watcher.
struct ShapeCluster {
    cluster: LocalCluster,
    watcher: TableWatcher,
    model: ModelSpec,
    dispatch: DispatchLayout,
    connections_per_worker: usize,
    chunked_dispatch: bool,
}

impl ShapeCluster {
    async fn start(
        model: ModelSpec,
        workers: usize,
        max_tokens: usize,
        settings: &BenchSettings,
    ) -> Result<Self, BenchError> {
        let mut config = LocalClusterConfig::next_to(&settings.worker_bin, model.clone(), workers);
        config.coordinator_bin = settings.coordinator_bin.clone();
        config.worker_bin = settings.worker_bin.clone();
        config.max_batch_tokens = max_tokens;
        config.torch_threads = settings.worker_torch_threads;
        config.hosts = settings.hosts;
        config.dev_tls = settings.dev_tls.clone();
        config.worker_args = vec!["--batch-wait-us".into(), settings.batch_wait_us.to_string()];
        if settings.identity_experts {
            config.worker_args.push("--identity-experts".into());
            if !settings.identity_hold.is_zero() {
                config
                    .worker_args
                    .extend(["--identity-hold-us".into(), settings.identity_hold.as_micros().to_string()]);
            }
        }
        if let Some(dtype) = settings.compute_dtype {
            config.worker_args.extend(["--dtype".into(), dtype.name().into()]);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            config.log_filter = Some("warn".into());
        }
        let mut cluster = LocalCluster::start(config).await?;
        let connected = async {
            let watcher = TableWatcher::start(&cluster.coordinator_uri())?;
            watcher.wait_for(|table| table.is_complete(), Duration::from_secs(120)).await?;
            Ok::<_, ClientError>(watcher)
        }
        .await;
        match connected {
            Ok(watcher) => Ok(Self {
                cluster,
                watcher,
                model,
                dispatch: settings.dispatch,
                connections_per_worker: settings.connections_per_worker,
                chunked_dispatch: settings.chunked_dispatch,
            }),
            Err(error) => {
                cluster.stop(Duration::from_secs(2)).await;
                Err(error.into())
            }
        }
    }

    fn client(&self, wire_dtype: WireDtype) -> Arc<MoeClient> {
        let options = ClientOptions {
            wire_dtype,
            dispatch: self.dispatch,
            connections_per_worker: self.connections_per_worker,
            chunked_dispatch: self.chunked_dispatch,
            ..ClientOptions::default()
        };
        Arc::new(MoeClient::new(self.watcher.receiver(), options))
    }

    async fn stop(mut self) {
        self.cluster.stop(Duration::from_secs(5)).await;
    }
}

/// Warm-up calls, then the measured ones (so the socket counters cover exactly the measured calls).
async fn measure(
    target: Target,
    settings: &BenchSettings,
    tokens: usize,
    name: &str,
) -> Result<LoadReport, BenchError> {
    let warmup = warmup_calls(settings);
    if warmup > 0 {
        let spec = LoadSpec::closed_loop(settings.concurrency, settings.point_time, tokens, warmup, 1);
        loadtest::run(target.clone(), spec, "warm-up").await?;
    }
    let spec = LoadSpec::closed_loop(settings.concurrency, settings.point_time, tokens, settings.calls, 1);
    Ok(loadtest::run(target, spec, name).await?)
}

/// The warm-up's calls: the settings' own, but at least one per connection to a worker (a call of
/// one request per worker takes one of each worker's connections, in turn), so that no connection
/// is opened, or still in TCP's slow start, during a measured call. With two connections per
/// worker and one warm-up call, the DeepEP low-latency preset's first measured call opened the
/// second: 2.6-4.3 ms against 1.8 ms.
pub fn warmup_calls(settings: &BenchSettings) -> u64 {
    match settings.warmup_calls {
        0 => 0,
        calls => calls.max(settings.connections_per_worker as u64),
    }
}

/// One point's calls through both targets and the TCP and gRPC echoes of one request's bytes,
/// taking turns.
struct Alternated {
    distributed: LoadReport,
    in_process: LoadReport,
    tcp_round_trip: wire::WireFigure,
    grpc_round_trip: wire::WireFigure,
}

/// Measures a point in [`MEASURE_ROUNDS`] rounds, each a share of the distributed calls, the same
/// share through the in-process layer, then a share of the TCP and gRPC echoes, so that the
/// overhead ratio and the network floors compare calls made under the same conditions. `point_time` bounds the
/// whole, spread over the rounds.
async fn measure_alternating(
    client: Arc<MoeClient>,
    reference: &Arc<ReferenceLayer>,
    settings: &BenchSettings,
    tokens: usize,
) -> Result<Alternated, BenchError> {
    let rounds = settings.calls.clamp(1, MEASURE_ROUNDS);
    let (mut distributed, mut in_process): (Option<LoadReport>, Option<LoadReport>) = (None, None);
    let (mut tcp_times, mut grpc_times) = (Vec::new(), Vec::new());
    let mut request_bytes = 1;
    for round in 0..rounds {
        let round_settings =
            BenchSettings { point_time: settings.point_time / rounds as u32, ..round_of(settings, round, rounds) };
        let report = measure(Target::Distributed(client.clone()), &round_settings, tokens, "distributed").await?;
        let total = absorb(&mut distributed, report);
        let requests: u64 = total.ledger.pairs.values().map(|pair| pair.requests).sum();
        request_bytes = (total.bytes_total.message_sent / requests.max(1)).max(1) as usize;
        let report = measure(Target::Reference(reference.clone()), &round_settings, tokens, "in-process").await?;
        absorb(&mut in_process, report);
        let repeats = settings.baseline_repeats.div_ceil(rounds as u32);
        tcp_times.extend(wire::tcp_echo_times(request_bytes, repeats).await?);
        grpc_times.extend(wire::grpc_echo_times(request_bytes, repeats).await?);
    }
    Ok(Alternated {
        distributed: distributed.expect("at least one round"),
        in_process: in_process.expect("at least one round"),
        tcp_round_trip: wire::WireFigure::echo(request_bytes as u64, &tcp_times),
        grpc_round_trip: wire::WireFigure::echo(request_bytes as u64, &grpc_times),
    })
}

/// `settings` for round `round` of `rounds`: its share of the calls, the warm-up in the first.
fn round_of(settings: &BenchSettings, round: u64, rounds: u64) -> BenchSettings {
    BenchSettings {
        calls: settings.calls / rounds + u64::from(round < settings.calls % rounds),
        warmup_calls: if round == 0 { settings.warmup_calls } else { 0 },
        ..settings.clone()
    }
}

/// Adds one round's report to the total so far.
fn absorb(total: &mut Option<LoadReport>, round: LoadReport) -> &LoadReport {
    match total {
        Some(total) => {
            total.absorb(round);
            total
        }
        None => total.insert(round),
    }
}

/// A few calls of the largest batch through both targets, so every expert has run (libtorch's first
/// forward of each is slow) before anything is measured.
async fn warm_up_every_expert(
    cluster: &ShapeCluster,
    reference: &Arc<ReferenceLayer>,
    axes: &plan::Axes,
) -> Result<(), BenchError> {
    let tokens = axes.tokens.iter().copied().max().unwrap_or(1);
    let spec = LoadSpec::closed_loop(1, Duration::from_secs(60), tokens, 3, 2);
    for dtype in &axes.wire_dtypes {
        loadtest::run(Target::Distributed(cluster.client(*dtype)), spec.clone(), "warm-up").await?;
    }
    loadtest::run(Target::Reference(reference.clone()), spec, "warm-up").await?;
    Ok(())
}

/// One call through both, on the same input: how far the wire dtype moves the output.
async fn wire_error(client: &MoeClient, reference: &ReferenceLayer, tokens: usize) -> Result<f64, BenchError> {
    let model = reference.model();
    let gate = gate_rows(model, 0)?;
    let inputs =
        Inputs::generate(&Skew::Uniform, &gate, model.experts_per_layer as usize, tokens, model.d_model as usize, 7);
    let hidden = inputs.pick(0, Duration::ZERO);
    let distributed = client.forward(0, &hidden).await?;
    let expected = reference.forward(0, &hidden, &RoutingOverrides::default()).await?;
    Ok(relative_frobenius_error(&distributed.hidden, &expected.hidden))
}

/// Called after each point with (points done, points in all, the point's one-line summary).
pub type Progress<'a> = &'a (dyn Fn(usize, usize, &str) + Sync);

/// Counts measured points and reports each to the caller's [`Progress`].
struct Tally<'a> {
    done: usize,
    total: usize,
    progress: Progress<'a>,
}

impl Tally<'_> {
    fn finished(&mut self, line: &str) {
        self.done += 1;
        (self.progress)(self.done, self.total, line);
    }
}

/// Runs `plan`: the sweep, then the presets.
pub async fn run(
    plan: &BenchPlan,
    settings: &BenchSettings,
    progress: Progress<'_>,
) -> Result<BenchReport, BenchError> {
    let shapes = if plan.sweep { plan.axes.shapes(plan.grid) } else { Vec::new() };
    let links: Vec<Option<LinkRate>> = match &plan.link_rates[..] {
        [] => vec![None],
        rates => rates.iter().copied().map(Some).collect(),
    };
    let total = shapes.iter().map(|shape| plan.axes.points_of(*shape).len()).sum::<usize>()
        + (plan.presets.len() + usize::from(plan.step.is_some())) * links.len();
    let mut tally = Tally { done: 0, total, progress };
    // Measured first, while nothing else of the run keeps the cores awake.
    let thread_wake = tokio::task::spawn_blocking(|| wake::measure(WAKE_ROUND_TRIPS)).await.ok();
    let mut points = Vec::new();
    let max_tokens = plan.axes.tokens.iter().copied().max().unwrap_or(1);
    let device_peaks = if shapes.is_empty() || settings.identity_experts {
        Vec::new()
    } else {
        let device = tch::Device::cuda_if_available();
        let dtype = settings.model.resident_dtype(settings.compute_dtype, device.is_cuda());
        let mut threads = vec![settings.worker_torch_threads];
        threads.extend(shapes.iter().map(|shape| reference_threads(*shape, settings)));
        peak::measure(device, dtype, &threads).await
    };
    for shape in shapes {
        let model = model_of(shape, settings, CapacityPolicy::Factor(settings.capacity_factor))?;
        let cluster = ShapeCluster::start(model.clone(), shape.workers, max_tokens, settings).await?;
        let measured = measure_shape(&cluster, &plan.axes, shape, settings, &device_peaks, &mut tally).await;
        cluster.stop().await;
        points.extend(measured?);
    }
    let mut presets = Vec::new();
    for &link in &links {
        for preset in &plan.presets {
            let shape = preset.shape(plan.preset_workers);
            let identity = preset_settings(settings, plan, link);
            // DeepEP never drops.
            let model = model_of(shape, &identity, CapacityPolicy::Dropless)?;
            let cluster = ShapeCluster::start(model.clone(), shape.workers, preset.tokens(), &identity).await?;
            let measured = measure_preset(&cluster, *preset, shape, &identity, link).await;
            cluster.stop().await;
            let measured = measured?;
            tally.finished(&preset_line(&measured));
            presets.push(measured);
        }
    }
    let mut steps = Vec::new();
    if let Some(step) = plan.step {
        let shape = plan.axes.shapes(false)[0];
        for &link in &links {
            let settings = BenchSettings { hosts: plan.hosts_behind(link, settings.hosts), ..settings.clone() };
            let mut model = model_of(shape, &settings, CapacityPolicy::Factor(settings.capacity_factor))?;
            model.moe_layers = (0..step.layers).collect();
            let model = model.validate()?;
            let cluster = ShapeCluster::start(model, shape.workers, step.tokens, &settings).await?;
            let measured = measure_step(&cluster, step, shape, &settings, link, &plan.axes).await;
            cluster.stop().await;
            let measured = measured?;
            tally.finished(&step_line(&measured));
            steps.push(measured);
        }
    }
    Ok(BenchReport {
        settings_summary: settings_json(settings, plan),
        points,
        presets,
        steps,
        machine: machine_summary(),
        thread_wake,
        device_peaks,
    })
}

/// How the presets are measured: identity experts without a hold (the transfers alone), the plan's
/// calls and time, on `link` if any, the workers waiting for a call's whole dispatch unless the
/// plan overlaps.
pub fn preset_settings(settings: &BenchSettings, plan: &BenchPlan, link: Option<LinkRate>) -> BenchSettings {
    BenchSettings {
        identity_experts: true,
        identity_hold: Duration::ZERO,
        batch_wait_us: if plan.preset_overlap {
            settings.batch_wait_us
        } else {
            WHOLE_DISPATCH_WAIT.as_micros() as u64
        },
        calls: plan.preset_calls,
        point_time: plan.preset_time,
        warmup_calls: settings.warmup_calls.min(1),
        hosts: plan.hosts_behind(link, settings.hosts),
        ..settings.clone()
    }
}

/// The reference computes with as many libtorch threads as all the workers have together.
fn reference_threads(shape: ClusterShape, settings: &BenchSettings) -> u32 {
    (shape.workers as u32 * settings.worker_torch_threads).max(1)
}

async fn measure_shape(
    cluster: &ShapeCluster,
    axes: &plan::Axes,
    shape: ClusterShape,
    settings: &BenchSettings,
    device_peaks: &[peak::DevicePeak],
    tally: &mut Tally<'_>,
) -> Result<Vec<PointResult>, BenchError> {
    let threads = reference_threads(shape, settings);
    let config = ReferenceConfig {
        device: tch::Device::cuda_if_available(),
        torch_threads: threads,
        identity_experts: settings.identity_experts,
        step_hold: settings.identity_hold,
        dtype: settings.compute_dtype,
    };
    let reference = Arc::new(ReferenceLayer::start(&cluster.model, &[0], config).await?);
    warm_up_every_expert(cluster, &reference, axes).await?;
    let mut results = Vec::new();
    for point in axes.points_of(shape) {
        let client = cluster.client(point.wire_dtype);
        let error = wire_error(&client, &reference, point.tokens).await?;
        let measured = measure_alternating(client, &reference, settings, point.tokens).await?;
        let result = PointResult {
            point,
            identity_experts: settings.identity_experts,
            flops_per_row: flops_per_row(&cluster.model, settings.identity_experts),
            distributed: measured.distributed,
            reference: Some(measured.in_process),
            tcp_round_trip: Some(measured.tcp_round_trip),
            grpc_round_trip: Some(measured.grpc_round_trip),
            wire_error: Some(error),
            worker_peak_gflops: peak::for_threads(device_peaks, settings.worker_torch_threads),
            reference_peak_gflops: peak::for_threads(device_peaks, threads),
        };
        tally.finished(&point_line(&result));
        results.push(result);
    }
    Ok(results)
}

async fn measure_preset(
    cluster: &ShapeCluster,
    preset: Preset,
    shape: ClusterShape,
    settings: &BenchSettings,
    link: Option<LinkRate>,
) -> Result<PresetResult, BenchError> {
    let point = Point { shape, tokens: preset.tokens(), wire_dtype: WireDtype::Bf16 };
    let client = cluster.client(WireDtype::Bf16);
    // This machine's loopback swings several-fold within seconds: the calls go in rounds, each
    // followed by its share of the single-connection TCP baseline, so that the ratio of the two
    // compares transfers made under the same conditions.
    let rounds = settings.calls.clamp(1, MEASURE_ROUNDS);
    let mut distributed: Option<LoadReport> = None;
    let mut tcp_times = Vec::new();
    let mut fan_out_times = Vec::new();
    let (mut after_gate_times, mut gate_total) = (Vec::new(), Duration::ZERO);
    let mut request_bytes = 1;
    let mut worker_bytes = 1;
    let mut cpu = cpu_time::CpuUsage::default();
    for round in 0..rounds {
        let round_settings = round_of(settings, round, rounds);
        let before = cpu_time::CpuTimes::now();
        let report = measure(Target::Distributed(client.clone()), &round_settings, point.tokens, preset.name()).await?;
        cpu.add(before, cpu_time::CpuTimes::now());
        let gate = report.mean_timing().gate;
        let total = absorb(&mut distributed, report);
        // The baselines move what one dispatch request carried.
        let requests: u64 = total.ledger.pairs.values().map(|pair| pair.requests).sum();
        request_bytes = (total.bytes_total.payload_sent / requests.max(1)).max(1) as usize;
        let repeats = settings.baseline_repeats.div_ceil(rounds as u32);
        tcp_times.extend(wire::tcp_one_way_times(request_bytes, repeats).await?);
        worker_bytes = busiest_worker_bytes(total).unwrap_or(request_bytes);
        if link.is_none() {
            let fan_out = |before| wire::tcp_to_every_receiver_times(shape.workers, worker_bytes, repeats, before);
            fan_out_times.extend(fan_out(wire::Before::PreviousRound).await?);
            // A dispatch follows its call's gate, which kept the client's cores busy.
            after_gate_times.extend(fan_out(wire::Before::BusyCores(gate)).await?);
            gate_total += gate;
        }
    }
    let distributed = distributed.expect("at least one round");
    let mut baselines = wire::measure(request_bytes, settings.baseline_repeats).await?;
    baselines.tcp_one_way = wire::WireFigure::one_way(request_bytes as u64, &tcp_times);
    let request_bytes = request_bytes as u64;
    let hosts = cluster.cluster.worker_hosts();
    let (link_tcp, links_tcp_at_once) = match hosts.first() {
        // The busiest worker's bytes per call, on every link at once: the same load as a dispatch.
        Some(host) if link.is_some() => (
            Some(wire::tcp_over_link(host, request_bytes.max(1) as usize, 3).await?),
            Some(wire::tcp_over_links_at_once(hosts, worker_bytes, 3).await?),
        ),
        _ => (None, None),
    };
    let to_every_worker = |times: &[Duration]| {
        (!times.is_empty())
            .then(|| wire::WireFigure::to_every_receiver(worker_bytes as u64, shape.workers as u64, times))
    };
    let tcp_to_every_worker = to_every_worker(&fan_out_times);
    let tcp_to_every_worker_after_gate = to_every_worker(&after_gate_times)
        .map(|figure| wire::AfterBusyCores { busy_us: gate_total.as_secs_f64() * 1e6 / rounds as f64, figure });
    let result = PointResult {
        point,
        identity_experts: true,
        flops_per_row: 0.0,
        distributed,
        reference: None,
        tcp_round_trip: Some(baselines.tcp_echo),
        grpc_round_trip: Some(baselines.grpc_echo),
        wire_error: None,
        worker_peak_gflops: None,
        reference_peak_gflops: None,
    };
    let gate_shape = [point.tokens as i64, i64::from(shape.d_model), i64::from(shape.experts)];
    let gate_flops = 2.0 * gate_shape.iter().map(|size| *size as f64).product::<f64>();
    let [tokens, d_model, experts] = gate_shape.map(|size| size as usize);
    let gate_threads = gate::product_threads(tokens, experts, d_model, client.options().cpu_threads);
    let cpu_gemm_gflops = tokio::task::spawn_blocking(move || {
        switchyard_experts::peak::measure_product(
            tch::Device::Cpu,
            WeightDtype::F32,
            gate_threads as i32,
            gate_shape,
            5,
        ) / 1e9
    })
    .await
    .ok();
    Ok(PresetResult {
        name: preset.name(),
        result,
        baselines,
        link,
        link_tcp,
        links_tcp_at_once,
        tcp_to_every_worker,
        tcp_to_every_worker_after_gate,
        cpu: cpu.shares(),
        gate_flops,
        gate_threads,
        cpu_gemm_gflops,
    })
}

/// The most payload bytes one worker was sent per call in `report`.
fn busiest_worker_bytes(report: &LoadReport) -> Option<usize> {
    let busiest = report.ledger.pairs.values().map(|pair| pair.bytes.payload_sent / pair.calls.max(1)).max()?;
    Some(busiest.max(1) as usize)
}

async fn measure_step(
    cluster: &ShapeCluster,
    plan: StepPlan,
    shape: ClusterShape,
    settings: &BenchSettings,
    link: Option<LinkRate>,
    axes: &plan::Axes,
) -> Result<StepResult, BenchError> {
    let layers: Vec<u32> = cluster.model.moe_layers.clone();
    let config = ReferenceConfig {
        device: tch::Device::cuda_if_available(),
        torch_threads: reference_threads(shape, settings),
        identity_experts: settings.identity_experts,
        step_hold: settings.identity_hold,
        dtype: settings.compute_dtype,
    };
    let reference = Arc::new(ReferenceLayer::start(&cluster.model, &layers, config).await?);
    let step = ModelStep { layers, attention: plan.attention };
    let spec = |requests: u64, seed: u64| LoadSpec {
        step: Some(step.clone()),
        ..LoadSpec::closed_loop(settings.concurrency, settings.point_time, plan.tokens, requests, seed)
    };
    let wire_dtype = axes.wire_dtypes.first().copied().unwrap_or(WireDtype::F32);
    let client = cluster.client(wire_dtype);
    // Every expert of every layer runs once before anything is measured.
    for target in [Target::Distributed(client.clone()), Target::Reference(reference.clone())] {
        loadtest::run(target, spec(settings.warmup_calls.max(2), 2), "warm-up").await?;
    }
    let distributed = loadtest::run(Target::Distributed(client), spec(settings.calls, 1), "distributed").await?;
    let in_process = loadtest::run(Target::Reference(reference), spec(settings.calls, 1), "in-process").await?;
    Ok(StepResult { shape, plan, link, distributed, reference: in_process })
}

fn step_line(step: &StepResult) -> String {
    let summary = step.summary();
    format!(
        "step of {} layers, {} tokens{}: {:.2} ms distributed ({:.0}% communication), {:.2} ms in-process",
        summary.layers,
        summary.tokens,
        summary.link_rate.as_ref().map_or_else(String::new, |rate| format!(" on {rate} links")),
        summary.distributed.step_ms,
        100.0 * summary.distributed.communication_ms / summary.distributed.step_ms.max(1e-12),
        summary.reference.step_ms,
    )
}

/// FLOPs of one row through one expert: 2 per multiply-add, one `d_model × d_ff` product per matrix.
pub fn flops_per_row(model: &ModelSpec, identity: bool) -> f64 {
    if identity {
        return 0.0;
    }
    2.0 * model.activation.matrices() as f64 * f64::from(model.d_model) * f64::from(model.d_ff)
}

fn point_line(result: &PointResult) -> String {
    format!(
        "{}, {} tokens, {}: {:.2} ms distributed, {} in-process",
        result.point.shape,
        result.point.tokens,
        result.point.wire_dtype.name(),
        result.distributed_ms(),
        result.reference_ms().map_or("-".into(), |ms| format!("{ms:.2} ms")),
    )
}

fn preset_line(preset: &PresetResult) -> String {
    let summary = preset.summary();
    let beside = |share_of_one: f64, share_of_every: Option<f64>| match share_of_every {
        Some(every) => format!(
            ": {:.0}% of TCP on one connection, {:.0}% of TCP to every worker at once",
            share_of_one * 100.0,
            every * 100.0
        ),
        None => String::new(),
    };
    let after_gate =
        match (summary.tcp_to_every_worker_after_gate, summary.dispatch_share_of_tcp_to_every_worker_after_gate) {
            (Some(after), Some(share)) => format!(
                ", {:.0}% of it right after every core was busy as long as the gate ({:.1} ms)",
                share * 100.0,
                after.busy_us / 1e3
            ),
            _ => String::new(),
        };
    let link = match (summary.link_rate, summary.floor_ratios()) {
        (Some(rate), Some((dispatch, combine))) => {
            format!(" on {rate} links: whole transfers {dispatch:.2}x and {combine:.2}x the link's floor")
        }
        _ => String::new(),
    };
    format!(
        "{}: dispatch {:.0} µs ({:.2} GB/s{}), combine {:.0} µs ({:.2} GB/s{}){link}",
        preset.name,
        summary.dispatch_transfer_us,
        summary.dispatch_gb_per_s,
        beside(summary.dispatch_share_of_tcp, summary.dispatch_share_of_tcp_to_every_worker) + &after_gate,
        summary.combine_transfer_us,
        summary.combine_gb_per_s,
        beside(summary.combine_share_of_tcp, summary.combine_share_of_tcp_to_every_worker),
    )
}

fn settings_json(settings: &BenchSettings, plan: &BenchPlan) -> serde_json::Value {
    serde_json::json!({
        "calls_per_point": settings.calls,
        "warmup_calls": settings.warmup_calls,
        "point_time_s": settings.point_time.as_secs_f64(),
        "concurrency": settings.concurrency,
        "identity_experts": settings.identity_experts,
        "identity_hold_us": settings.identity_hold.as_micros() as u64,
        "worker_torch_threads": settings.worker_torch_threads,
        "compute_dtype": settings.compute_dtype.map_or_else(|| "default".to_owned(), |dtype| dtype.to_string()),
        "batch_wait_us": settings.batch_wait_us,
        "capacity_factor": settings.capacity_factor,
        "dispatch": format!("{:?}", settings.dispatch),
        "connections_per_worker": settings.connections_per_worker,
        "chunked_dispatch": settings.chunked_dispatch,
        "activation": format!("{:?}", settings.model.activation),
        "grid": plan.grid,
        "preset_workers": plan.preset_workers,
        "preset_calls": plan.preset_calls,
        "preset_time_s": plan.preset_time.as_secs_f64(),
        "preset_overlap": plan.preset_overlap,
        "link_rates": plan.link_rates.iter().map(LinkRate::to_string).collect::<Vec<_>>(),
        "link_congestion": plan.link_congestion.to_string(),
        "mutual_tls": settings.dev_tls.is_some(),
        "step": plan.step.map(|step| serde_json::json!({
            "layers": step.layers,
            "tokens": step.tokens,
            "attention": step.attention.describe(),
        })),
    })
}

/// CPU model and core count, for the report's header.
fn machine_summary() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let cuda = if tch::Cuda::is_available() {
        format!("CUDA: {}", gpu_names().unwrap_or_else(|| format!("{} device(s)", tch::Cuda::device_count())))
    } else {
        "no CUDA".to_owned()
    };
    // KVM guests' cpuidle-haltpoll: at 0 an idle core halts at once and every wake of a thread on
    // it waits for the host (a condvar round trip ~10x slower than with polling, on the machine
    // this was written on).
    let halt_polling = std::fs::read_to_string("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
        .map(|nanos| format!(", guest halt polling {} ns", nanos.trim()))
        .unwrap_or_default();
    format!("{cpu}, {cores} cores available, {cuda}{halt_polling}")
}

/// The GPUs' names as `nvidia-smi` reports them, when it is there.
fn gpu_names() -> Option<String> {
    let output =
        std::process::Command::new("nvidia-smi").args(["--query-gpu=name", "--format=csv,noheader"]).output().ok()?;
    let names = String::from_utf8_lossy(&output.stdout).lines().map(str::trim).collect::<Vec<_>>().join(", ");
    (output.status.success() && !names.is_empty()).then_some(names)
}
