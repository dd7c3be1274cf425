//! Measuring one point, preset or step on a running cluster: the calls in rounds that take turns
//! with what they are compared against (the in-process layer, raw TCP, a plain gRPC echo).

use std::sync::Arc;
use std::time::Duration;

use switchyard_loadtest::loadtest::{self, LoadReport, LoadSpec, ModelStep, Target};
use switchyard_loadtest::shaped_network::LinkRate;
use switchyard_loadtest::skew::{Inputs, Skew, gate_rows};
use switchyard_model::WeightDtype;
use switchyard_proto::wire::WireDtype;
use switchyard_reference::{ReferenceConfig, ReferenceLayer, relative_frobenius_error};
use switchyard_router_client::client::MoeClient;
use switchyard_router_client::projection;
use switchyard_router_client::router::RoutingOverrides;

use super::cluster::ShapeCluster;
use super::plan::{Axes, ClusterShape, Point, Preset, StepPlan};
use super::process_cpu::{CpuPerCall, CpuReading, CpuSpent};
use super::progress::{Tally, point_line};
use super::results::{PointResult, PresetResult, StepResult};
use super::{BenchError, BenchSettings, cpu_time, flops_per_row, peak, wire};

/// Rounds a point's or preset's calls are measured in: this machine's loopback and scheduler swing
/// several-fold within seconds, so what is compared (distributed, in-process, raw TCP) takes turns.
const MEASURE_ROUNDS: u64 = 5;

/// Warm-up calls, then the measured ones (so the socket counters cover exactly the measured calls,
/// and so does the CPU time of this process and `cpu`'s others added to its tally).
async fn measure(
    target: Target,
    settings: &BenchSettings,
    tokens: usize,
    name: &str,
    cpu: Option<(&[u32], &mut CpuSpent)>,
) -> Result<LoadReport, BenchError> {
    let warmup = warmup_calls(settings);
    if warmup > 0 {
        let spec = LoadSpec::closed_loop(settings.concurrency, settings.point_time, tokens, warmup, 1);
        loadtest::run(target.clone(), spec, "warm-up").await?;
    }
    let spec = LoadSpec::closed_loop(settings.concurrency, settings.point_time, tokens, settings.calls, 1);
    let Some((processes, spent)) = cpu else { return Ok(loadtest::run(target, spec, name).await?) };
    let before = CpuReading::before(processes);
    let report = loadtest::run(target, spec, name).await?;
    spent.add(before, CpuReading::after(processes));
    Ok(report)
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
    cpu_per_call: Option<CpuPerCall>,
}

/// Measures a point in [`MEASURE_ROUNDS`] rounds, each a share of the distributed calls, the same
/// share through the in-process layer, then a share of the TCP and gRPC echoes, so that the
/// overhead ratio and the network floors compare calls made under the same conditions. `point_time` bounds the
/// whole, spread over the rounds. Both targets' calls are charged the CPU time of this process and
/// of `cluster_processes`.
async fn measure_alternating(
    client: Arc<MoeClient>,
    reference: &Arc<ReferenceLayer>,
    cluster_processes: &[u32],
    settings: &BenchSettings,
    tokens: usize,
) -> Result<Alternated, BenchError> {
    let rounds = settings.calls.clamp(1, MEASURE_ROUNDS);
    let (mut distributed, mut in_process): (Option<LoadReport>, Option<LoadReport>) = (None, None);
    let (mut distributed_cpu, mut in_process_cpu) = (CpuSpent::default(), CpuSpent::default());
    let (mut tcp_times, mut grpc_times) = (Vec::new(), Vec::new());
    let mut request_bytes = 1;
    for round in 0..rounds {
        let round_settings =
            BenchSettings { point_time: settings.point_time / rounds as u32, ..round_of(settings, round, rounds) };
        let target = Target::Distributed(client.clone());
        let report =
            measure(target, &round_settings, tokens, "distributed", Some((cluster_processes, &mut distributed_cpu)))
                .await?;
        let total = absorb(&mut distributed, report);
        request_bytes = per_request(total, total.bytes_total.message_sent);
        let target = Target::Reference(reference.clone());
        let report =
            measure(target, &round_settings, tokens, "in-process", Some((cluster_processes, &mut in_process_cpu)))
                .await?;
        absorb(&mut in_process, report);
        let repeats = settings.baseline_repeats.div_ceil(rounds as u32);
        tcp_times.extend(wire::tcp_echo_times(request_bytes, repeats).await?);
        grpc_times.extend(wire::grpc_echo_times(request_bytes, repeats).await?);
    }
    let (distributed, in_process) = (distributed.expect("at least one round"), in_process.expect("at least one round"));
    let cpu_per_call = distributed_cpu
        .per_call_us(distributed.calls)
        .zip(in_process_cpu.per_call_us(in_process.calls))
        .map(|(distributed_us, in_process_us)| CpuPerCall { distributed_us, in_process_us });
    Ok(Alternated {
        distributed,
        in_process,
        tcp_round_trip: wire::WireFigure::echo(request_bytes as u64, &tcp_times),
        grpc_round_trip: wire::WireFigure::echo(request_bytes as u64, &grpc_times),
        cpu_per_call,
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
    axes: &Axes,
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

/// The reference computes with as many libtorch threads as all the workers have together.
pub(super) fn reference_threads(shape: ClusterShape, settings: &BenchSettings) -> u32 {
    (shape.workers as u32 * settings.worker_torch_threads).max(1)
}

pub(super) async fn measure_shape(
    cluster: &ShapeCluster,
    axes: &Axes,
    shape: ClusterShape,
    settings: &BenchSettings,
    device_peaks: &[peak::DevicePeak],
    tally: &mut Tally<'_>,
) -> Result<Vec<PointResult>, BenchError> {
    let threads = reference_threads(shape, settings);
    let config = ReferenceConfig {
        device: settings.device,
        torch_threads: threads,
        identity_experts: settings.identity_experts,
        step_hold: settings.identity_hold,
        grouped_experts: settings.grouped_experts,
        dtype: settings.compute_dtype,
        ..ReferenceConfig::cpu()
    };
    let reference = Arc::new(ReferenceLayer::start(&cluster.model, &[0], config).await?);
    warm_up_every_expert(cluster, &reference, axes).await?;
    let mut results = Vec::new();
    for point in axes.points_of(shape) {
        let client = cluster.client(point.wire_dtype);
        let error = wire_error(&client, &reference, point.tokens).await?;
        let measured = measure_alternating(client, &reference, &cluster.process_ids(), settings, point.tokens).await?;
        let result = PointResult {
            point,
            identity_experts: settings.identity_experts,
            flops_per_row: flops_per_row(&cluster.model, settings.identity_experts),
            distributed: measured.distributed,
            reference: Some(measured.in_process),
            tcp_round_trip: Some(measured.tcp_round_trip),
            grpc_round_trip: Some(measured.grpc_round_trip),
            wire_error: Some(error),
            cpu_per_call: measured.cpu_per_call,
            worker_peak_gflops: peak::for_threads(device_peaks, settings.worker_torch_threads),
            reference_peak_gflops: peak::for_threads(device_peaks, threads),
        };
        tally.finished(&point_line(&result));
        results.push(result);
    }
    Ok(results)
}

pub(super) async fn measure_preset(
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
        let report =
            measure(Target::Distributed(client.clone()), &round_settings, point.tokens, preset.name(), None).await?;
        cpu.add(before, cpu_time::CpuTimes::now());
        let gate = report.mean_timing().gate;
        let total = absorb(&mut distributed, report);
        // The baselines move what one dispatch request carried.
        request_bytes = per_request(total, total.bytes_total.payload_sent);
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
    let hosts = cluster.worker_hosts();
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
        cpu_per_call: None,
        worker_peak_gflops: None,
        reference_peak_gflops: None,
    };
    let gate = GateYardstick::measure(point, client.options().cpu_threads).await;
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
        gate_flops: gate.flops,
        gate_threads: gate.threads,
        cpu_gemm_gflops: gate.cpu_gemm_gflops,
    })
}

/// The client's gate in one call of a point, and what it is measured against.
struct GateYardstick {
    /// `2 · tokens · d_model · experts`.
    flops: f64,
    /// The threads the client's gate uses for this product (its CPU threads, as many as the
    /// product is worth).
    threads: usize,
    /// tch's f32 GEMM of the gate's own shape on as many CPU threads, measured now.
    cpu_gemm_gflops: Option<f64>,
}

impl GateYardstick {
    async fn measure(point: Point, cpu_threads: usize) -> Self {
        let shape = [point.tokens as i64, i64::from(point.shape.d_model), i64::from(point.shape.experts)];
        let flops = 2.0 * shape.iter().map(|size| *size as f64).product::<f64>();
        let [tokens, d_model, experts] = shape.map(|size| size as usize);
        let threads = projection::product_threads(tokens, experts, d_model, cpu_threads);
        let cpu_gemm_gflops = tokio::task::spawn_blocking(move || {
            switchyard_experts::peak::measure_product(tch::Device::Cpu, WeightDtype::F32, threads as i32, shape, 5)
                / 1e9
        })
        .await
        .ok();
        Self { flops, threads, cpu_gemm_gflops }
    }
}

/// `bytes` of `report`'s calls over the requests they made (at least 1): what a baseline moves
/// to stand beside one request.
fn per_request(report: &LoadReport, bytes: u64) -> usize {
    let requests: u64 = report.ledger.pairs.values().map(|pair| pair.requests).sum();
    (bytes / requests.max(1)).max(1) as usize
}

/// The most payload bytes one worker was sent per call in `report`.
fn busiest_worker_bytes(report: &LoadReport) -> Option<usize> {
    let busiest = report.ledger.pairs.values().map(|pair| pair.bytes.payload_sent / pair.calls.max(1)).max()?;
    Some(busiest.max(1) as usize)
}

pub(super) async fn measure_step(
    cluster: &ShapeCluster,
    plan: StepPlan,
    shape: ClusterShape,
    settings: &BenchSettings,
    link: Option<LinkRate>,
    axes: &Axes,
) -> Result<StepResult, BenchError> {
    let layers: Vec<u32> = cluster.model.moe_layers.clone();
    let config = ReferenceConfig {
        device: settings.device,
        torch_threads: reference_threads(shape, settings),
        identity_experts: settings.identity_experts,
        step_hold: settings.identity_hold,
        grouped_experts: settings.grouped_experts,
        dtype: settings.compute_dtype,
        ..ReferenceConfig::cpu()
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

#[cfg(test)]
mod tests {
    use switchyard_router_client::ledger::PairTotals;
    use switchyard_router_client::timing::ByteCounts;

    use super::*;
    use crate::bench::results::tests::point;
    use crate::bench::tests::settings;

    #[test]
    fn the_rounds_share_the_calls_and_only_the_first_warms_up() {
        let settings = BenchSettings { calls: 12, warmup_calls: 3, ..settings() };
        let rounds: Vec<BenchSettings> = (0..5).map(|round| round_of(&settings, round, 5)).collect();
        assert_eq!(rounds.iter().map(|round| round.calls).collect::<Vec<_>>(), [3, 3, 2, 2, 2]);
        assert_eq!(rounds.iter().map(|round| round.warmup_calls).collect::<Vec<_>>(), [3, 0, 0, 0, 0]);
        assert!(rounds.iter().all(|round| round.point_time == settings.point_time), "measure_alternating splits it");
        let settings = BenchSettings { calls: 10, ..settings };
        let calls: Vec<u64> = (0..5).map(|round| round_of(&settings, round, 5).calls).collect();
        assert_eq!(calls, [2; 5]);
    }

    #[test]
    fn the_rounds_reports_add_up() {
        let mut total = None;
        assert_eq!(absorb(&mut total, point().distributed).calls, 4, "the first round is the total");
        let summed = absorb(&mut total, point().distributed);
        assert_eq!((summed.calls, summed.tokens), (8, 80));
        assert_eq!(summed.bytes_total.payload_sent, 2 * point().distributed.bytes_total.payload_sent);
    }

    #[test]
    fn the_reference_gets_every_workers_threads() {
        let shape = point().point.shape;
        let three_threads = BenchSettings { worker_torch_threads: 3, ..settings() };
        assert_eq!(reference_threads(shape, &three_threads), 6);
        assert_eq!(reference_threads(ClusterShape { workers: 1, ..shape }, &settings()), 1);
    }

    #[test]
    fn the_fan_out_moves_the_busiest_workers_bytes_per_call() {
        let mut report = point().distributed;
        report.ledger.pairs.clear();
        assert_eq!(busiest_worker_bytes(&report), None, "no worker was called");
        let sent = |calls, payload_sent| PairTotals {
            calls,
            bytes: ByteCounts { payload_sent, ..ByteCounts::default() },
            ..PairTotals::default()
        };
        report.ledger.pairs.insert((0, "w1".into()), sent(4, 4000));
        report.ledger.pairs.insert((0, "w2".into()), sent(2, 3000));
        assert_eq!(busiest_worker_bytes(&report), Some(1500), "3000 bytes over 2 calls beat 4000 over 4");
        report.ledger.pairs.insert((0, "w3".into()), sent(0, 0));
        assert_eq!(busiest_worker_bytes(&report), Some(1500), "a worker never called divides by nothing");
    }

    #[test]
    fn a_baseline_moves_one_requests_bytes() {
        let mut report = point().distributed;
        for (pair, requests) in report.ledger.pairs.values_mut().zip([3, 5]) {
            pair.requests = requests;
        }
        assert_eq!(per_request(&report, 4000), 500, "4000 bytes over 8 requests");
        assert_eq!(per_request(&report, 0), 1, "never an empty baseline");
        report.ledger.pairs.clear();
        assert_eq!(per_request(&report, 4000), 4000, "no request counted: the bytes as one");
    }

    #[tokio::test]
    async fn the_gates_yardstick_is_its_own_products_flops_and_gflops() {
        let point = Point {
            shape: ClusterShape { workers: 2, experts: 16, top_k: 2, d_model: 64, d_ff: 8 },
            tokens: 32,
            wire_dtype: WireDtype::Bf16,
        };
        let gate = GateYardstick::measure(point, 2).await;
        assert_eq!(gate.flops, 2.0 * 32.0 * 64.0 * 16.0);
        assert_eq!(gate.threads, projection::product_threads(32, 16, 64, 2));
        // GFLOP/s: a core does between a hundredth and a few hundred of them, never 1e9 times that.
        let gflops = gate.cpu_gemm_gflops.expect("tch's GEMM measured");
        assert!((0.01..10_000.0).contains(&gflops), "{gflops} GFLOP/s");
    }
}
