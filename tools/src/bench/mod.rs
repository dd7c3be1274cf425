//! `switchyard bench`: what expert parallelism costs, point by point.
//!
//! For each cluster shape ([`plan`]) the sweep starts a local coordinator and workers, then runs
//! every point (tokens per call × wire dtype) through the distributed layer and, in the same run,
//! through the in-process reference layer with the same inputs and routing: the communication
//! overhead is a ratio of two times measured minutes apart on one machine. The DeepEP presets
//! measure dispatch and combine alone (identity experts, bf16 both ways) beside this machine's raw
//! TCP and gRPC baselines ([`wire`]). `cluster` starts each shape's processes, `measure` runs its
//! calls in rounds beside what they are compared with, `results` keeps what was measured and
//! [`summary`] the figures derived from it; [`crate::report`] renders them.

mod cluster;
pub mod cpu_time;
mod machine;
mod measure;
pub mod peak;
pub mod plan;
pub mod process_cpu;
mod progress;
pub(crate) mod results;
pub mod spread;
pub mod summary;
pub mod wake;
pub mod wire;

pub use measure::warmup_calls;
pub use plan::{BenchPlan, Preset, StepPlan};
pub use progress::Progress;
pub use results::{BenchReport, PointResult, PresetResult, StepResult};
pub use summary::{BenchSummary, PhaseShares, PointSummary, PresetSummary, Quantiles, StepSummary};

use std::path::PathBuf;
use std::time::Duration;

use switchyard_experts::device::device_name;
use switchyard_loadtest::local_cluster::{Hosts, LocalClusterError};
use switchyard_loadtest::shaped_network::LinkRate;
use switchyard_model::{CapacityPolicy, ModelSpec, WeightDtype};
use switchyard_reference::ReferenceError;
use switchyard_router_client::DispatchLayout;
use switchyard_router_client::error::ClientError;

use self::cluster::ShapeCluster;
use self::machine::machine_summary;
use self::measure::{measure_preset, measure_shape, measure_step, reference_threads};
use self::plan::ClusterShape;
use self::progress::{Tally, preset_line, step_line};

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
    /// Each step's experts in one grouped product per matrix (workers' and the reference's alike).
    pub grouped_experts: bool,
    pub worker_torch_threads: u32,
    /// Where experts compute, on the workers (passed as their `--device`) and in the in-process
    /// reference alike: the two sides of every comparison on the same device.
    pub device: tch::Device,
    /// The dtype experts compute in, on the workers and in the reference alike; `None`: the
    /// device's default (bf16 on CUDA, f32 on CPU).
    pub compute_dtype: Option<WeightDtype>,
    pub batch_wait_us: u64,
    pub capacity_factor: f32,
    pub dispatch: DispatchLayout,
    pub connections_per_worker: usize,
    /// Whether large payloads go as streams of chunks ([`ClientOptions::chunked_dispatch`](switchyard_router_client::ClientOptions::chunked_dispatch)).
    pub chunked_dispatch: bool,
    /// Model fields the sweep does not vary (activation, seed).
    pub model: ModelSpec,
    /// Repeats of each wire baseline.
    pub baseline_repeats: u32,
    pub coordinator_bin: PathBuf,
    pub worker_bin: PathBuf,
    /// Loopback, or each worker on a host of its own behind a shaped link.
    pub hosts: Hosts,
    /// A development CA: the clusters run on mutual TLS ([`LocalClusterConfig::dev_tls`](switchyard_loadtest::local_cluster::LocalClusterConfig::dev_tls)).
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

/// Round trips of the thread wake measurement: about half a second where a wake costs 100 µs.
const WAKE_ROUND_TRIPS: u32 = 2000;

/// The presets' workers' batch wait unless they overlap: a step waits only while another request
/// is on its way in, so with a bound no call's dispatch outlasts, each worker computes once a
/// call's whole dispatch is in, as DeepEP's normal kernels do (dispatch, then experts, then
/// combine), and dispatch and combine are timed each alone, as DeepEP's tests time them. On a
/// machine short of cores an overlapped step shares them with the transfers still running (on
/// this project's 2-core machine, DeepEP-normal at 10 Gbit/s: 60-63% of the line rate overlapped,
/// 80-89% alone).
pub const WHOLE_DISPATCH_WAIT: Duration = Duration::from_secs(10);

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

/// Runs `plan`: the sweep, then the presets.
pub async fn run(
    plan: &BenchPlan,
    settings: &BenchSettings,
    progress: Progress<'_>,
) -> Result<BenchReport, BenchError> {
    let shapes = plan.swept_shapes();
    let links = plan.links();
    let mut tally = Tally::new(plan.measurements(), progress);
    // Measured first, while nothing else of the run keeps the cores awake.
    let thread_wake = tokio::task::spawn_blocking(|| wake::measure(WAKE_ROUND_TRIPS)).await.ok();
    let mut points = Vec::new();
    let max_tokens = plan.axes.tokens.iter().copied().max().unwrap_or(1);
    let device_peaks = if shapes.is_empty() || settings.identity_experts {
        Vec::new()
    } else {
        let device = settings.device;
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

/// FLOPs of one row through one expert: 2 per multiply-add, one `d_model × d_ff` product per matrix.
pub fn flops_per_row(model: &ModelSpec, identity: bool) -> f64 {
    if identity {
        return 0.0;
    }
    2.0 * model.activation.matrices() as f64 * f64::from(model.d_model) * f64::from(model.d_ff)
}

fn settings_json(settings: &BenchSettings, plan: &BenchPlan) -> serde_json::Value {
    serde_json::json!({
        "calls_per_point": settings.calls,
        "warmup_calls": settings.warmup_calls,
        "point_time_s": settings.point_time.as_secs_f64(),
        "concurrency": settings.concurrency,
        "identity_experts": settings.identity_experts,
        "identity_hold_us": settings.identity_hold.as_micros() as u64,
        "grouped_experts": settings.grouped_experts,
        "worker_torch_threads": settings.worker_torch_threads,
        "device": device_name(settings.device),
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

#[cfg(test)]
pub(crate) mod tests {
    use switchyard_loadtest::shaped_network::CongestionControl;
    use switchyard_model::Activation;

    use super::*;
    use crate::bench::plan::tests::presets_plan;

    /// `switchyard bench`'s defaults on a CPU machine.
    pub(crate) fn settings() -> BenchSettings {
        BenchSettings {
            calls: 20,
            warmup_calls: 3,
            point_time: Duration::from_secs(3),
            concurrency: 1,
            identity_experts: false,
            identity_hold: Duration::ZERO,
            grouped_experts: false,
            worker_torch_threads: 1,
            device: tch::Device::Cpu,
            compute_dtype: None,
            batch_wait_us: 0,
            capacity_factor: 1.25,
            dispatch: DispatchLayout::TokenMajor,
            connections_per_worker: 2,
            chunked_dispatch: false,
            model: ModelSpec::default_synthetic(),
            baseline_repeats: 10,
            coordinator_bin: "/opt/switchyard/switchyard-coordinator".into(),
            worker_bin: "/opt/switchyard/switchyard-worker".into(),
            hosts: Hosts::Loopback,
            dev_tls: None,
        }
    }

    const SHAPE: ClusterShape = ClusterShape { workers: 2, experts: 16, top_k: 4, d_model: 96, d_ff: 160 };

    #[test]
    fn a_shapes_model_is_the_shape_with_the_settings_activation() {
        let settings = settings();
        let model = ModelSpec { activation: Activation::Gelu, moe_layers: vec![0, 1, 2], ..settings.model.clone() };
        let settings = BenchSettings { model, ..settings };
        let model = model_of(SHAPE, &settings, CapacityPolicy::Factor(1.5)).expect("a valid model");
        assert_eq!(
            (model.experts_per_layer, model.top_k, model.d_model, model.d_ff),
            (SHAPE.experts, SHAPE.top_k, SHAPE.d_model, SHAPE.d_ff)
        );
        assert_eq!((model.moe_layers, model.capacity), (vec![0], CapacityPolicy::Factor(1.5)), "one layer a point");
        assert_eq!(model.activation, Activation::Gelu);

        let too_many = ClusterShape { top_k: 17, ..SHAPE };
        let error = model_of(too_many, &settings, CapacityPolicy::Dropless).expect_err("top-k above the experts");
        assert!(matches!(error, BenchError::Model(_)), "{error}");
    }

    #[test]
    fn the_presets_move_bytes_alone_with_the_plans_calls() {
        // The sweep's settings: real experts, and a hold the presets must not keep.
        let settings = BenchSettings {
            identity_experts: false,
            identity_hold: Duration::from_micros(500),
            calls: 7,
            warmup_calls: 4,
            batch_wait_us: 7,
            ..settings()
        };
        let plan = presets_plan();
        let presets = preset_settings(&settings, &plan, None);
        assert!(presets.identity_experts && presets.identity_hold.is_zero(), "{presets:?}");
        assert_eq!((presets.calls, presets.point_time), (11, Duration::from_secs(9)));
        assert_eq!(presets.warmup_calls, 1, "one warm-up call, then each connection once");
        assert_eq!(presets.batch_wait_us, WHOLE_DISPATCH_WAIT.as_micros() as u64);
        assert_eq!(presets.hosts, Hosts::Loopback);
        let overlapped = BenchPlan { preset_overlap: true, ..presets_plan() };
        assert_eq!(preset_settings(&settings, &overlapped, None).batch_wait_us, 7);

        let link: LinkRate = "10gbit".parse().expect("a rate");
        let behind_link = preset_settings(&settings, &plan, Some(link)).hosts;
        let expected = Hosts::Namespaces { worker_link: Some(link), congestion: CongestionControl::Bbr };
        assert_eq!(behind_link, expected);

        let no_warm_up = BenchSettings { warmup_calls: 0, ..settings };
        assert_eq!(preset_settings(&no_warm_up, &plan, None).warmup_calls, 0, "no warm-up when none is asked for");
    }

    #[test]
    fn a_row_costs_two_flops_per_weight_it_meets() {
        let model = model_of(SHAPE, &settings(), CapacityPolicy::Dropless).expect("a valid model");
        assert_eq!(model.activation.matrices(), 3, "SwiGLU by default");
        assert_eq!(flops_per_row(&model, false), 2.0 * 3.0 * 96.0 * 160.0);
        assert_eq!(flops_per_row(&model, true), 0.0, "identity experts compute nothing");
        let gelu = ModelSpec { activation: Activation::Gelu, ..model };
        assert_eq!(flops_per_row(&gelu, false), 2.0 * 2.0 * 96.0 * 160.0);
    }

    #[test]
    fn the_reports_settings_record_how_it_was_measured() {
        let settings = BenchSettings {
            calls: 7,
            worker_torch_threads: 2,
            grouped_experts: true,
            connections_per_worker: 3,
            ..settings()
        };
        let json = settings_json(&settings, &BenchPlan { preset_workers: 4, ..presets_plan() });
        assert_eq!(json["calls_per_point"], 7);
        assert_eq!(json["worker_torch_threads"], 2);
        assert_eq!(json["grouped_experts"], true);
        assert_eq!(json["connections_per_worker"], 3);
        assert_eq!(json["preset_workers"], 4);
        assert_eq!(json["link_congestion"], "bbr");
        assert_eq!(json["device"], "cpu");
        assert_eq!(json["mutual_tls"], false);
        assert!(json["step"].is_null(), "no step in this run");
    }
}
