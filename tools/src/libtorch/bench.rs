//! `switchyard bench`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use switchyard_experts::{DeviceChoice, ResolveDevice};
use switchyard_loadtest::loadtest::AttentionStandIn;
use switchyard_loadtest::local_cluster::Hosts;
use switchyard_loadtest::shaped_network::{CongestionControl, LinkRate};
use switchyard_model::ModelSpec;
use switchyard_tools::bench::plan::Axes;
use switchyard_tools::bench::{self, BenchPlan, BenchSettings, Preset, StepPlan};
use switchyard_tools::report;

use crate::cli::values::{
    ActivationArg, DispatchArg, DtypeArg, WireDtypeArg, parse_count, parse_duration, parse_positive_duration,
};
use switchyard_router_client::transport::default_connections;

/// The flags of `switchyard bench` (the command's help text is on `Command::Bench`).
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Report folder (created; files in it are replaced).
    #[arg(long, env = "SWITCHYARD_BENCH_OUT", default_value = "bench-report")]
    pub out: PathBuf,

    /// What to run.
    #[arg(long, env = "SWITCHYARD_BENCH_RUN", value_enum, default_value = "all")]
    pub run: RunWhat,

    /// Tokens per layer call.
    #[arg(long, env = "SWITCHYARD_BENCH_TOKENS", value_delimiter = ',', default_value = "1,16,64,256", value_parser = parse_count::<usize>)]
    pub tokens: Vec<usize>,

    /// Element types of rows on the wire.
    #[arg(long, env = "SWITCHYARD_BENCH_WIRE_DTYPES", value_enum, value_delimiter = ',', default_value = "f32,bf16")]
    pub wire_dtypes: Vec<WireDtypeArg>,

    /// How rows travel to the workers.
    #[arg(long, env = "SWITCHYARD_BENCH_DISPATCH", value_enum, default_value = "token-major")]
    pub dispatch: DispatchArg,

    /// HTTP/2 connections from the client to each worker (default: one per core, up to 8).
    #[arg(long, env = "SWITCHYARD_BENCH_CONNECTIONS_PER_WORKER", default_value_t = default_connections(), value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub connections_per_worker: usize,

    /// Send a large payload to one worker as a stream of ~4 MiB chunks the worker computes on as
    /// they arrive (default: each connection's share as one request, faster where cores are few)
    #[arg(long, env = "SWITCHYARD_BENCH_CHUNKED_DISPATCH", default_value_t = false, action = clap::ArgAction::Set)]
    pub chunked_dispatch: bool,

    /// Expert workers per cluster.
    #[arg(long, env = "SWITCHYARD_BENCH_WORKERS", value_delimiter = ',', default_value = "2,1,3", value_parser = parse_count::<usize>)]
    pub workers: Vec<usize>,

    /// Routed experts per layer.
    #[arg(long, env = "SWITCHYARD_BENCH_EXPERTS", value_delimiter = ',', default_value = "8,16", value_parser = parse_count::<u32>)]
    pub experts: Vec<u32>,

    /// Experts per token.
    #[arg(long, env = "SWITCHYARD_BENCH_TOP_K", value_delimiter = ',', default_value = "2,1,4", value_parser = parse_count::<u32>)]
    pub top_k: Vec<u32>,

    /// Model sizes as d_modelxd_ff.
    #[arg(long, env = "SWITCHYARD_BENCH_DIMS", value_delimiter = ',', default_value = "512x1024,1024x4096", value_parser = parse_dims)]
    pub dims: Vec<(u32, u32)>,

    /// Every combination of the cluster axes instead of one axis at a time.
    #[arg(long, env = "SWITCHYARD_BENCH_GRID")]
    pub grid: bool,

    /// Measured calls per point and target (fewer if --point-time runs out first).
    #[arg(long, env = "SWITCHYARD_BENCH_CALLS", default_value_t = 20, value_parser = parse_count::<u64>)]
    pub calls: u64,

    /// Unmeasured calls before each point's measured ones.
    #[arg(long, env = "SWITCHYARD_BENCH_WARMUP_CALLS", default_value_t = 3)]
    pub warmup_calls: u64,

    /// Most measured time per point and target.
    #[arg(long, env = "SWITCHYARD_BENCH_POINT_TIME", default_value = "3s", value_parser = parse_positive_duration)]
    pub point_time: Duration,

    /// Concurrent callers (1 keeps each call's ledger exact).
    #[arg(long, env = "SWITCHYARD_BENCH_CONCURRENCY", default_value_t = 1, value_parser = parse_count::<usize>)]
    pub concurrency: usize,

    /// Sweep with identity experts too (pure communication); the presets always use them.
    #[arg(long, env = "SWITCHYARD_BENCH_IDENTITY_EXPERTS")]
    pub identity_experts: bool,

    /// With --identity-experts, in the sweep and the model step (not the DeepEP presets, which
    /// time the transfers alone): each worker step, and the in-process reference's, keeps its
    /// compute thread busy this long (microseconds, spinning), standing in for expert compute
    /// without its memory traffic. Set it to a real step's compute time to see what the
    /// step's length alone costs the network phase (threads and cores that idled through it and
    /// must be woken after).
    #[arg(long, env = "SWITCHYARD_BENCH_IDENTITY_HOLD_US", default_value_t = 0, requires = "identity_experts")]
    pub identity_hold_us: u64,

    /// Compute each step's experts in one grouped product per matrix, on the workers (their
    /// `--grouped-experts`) and in the in-process reference alike.
    #[arg(long, env = "SWITCHYARD_BENCH_GROUPED_EXPERTS")]
    pub grouped_experts: bool,

    /// Workers of the DeepEP presets.
    #[arg(long, env = "SWITCHYARD_BENCH_PRESET_WORKERS", default_value_t = 2, value_parser = parse_count::<usize>)]
    pub preset_workers: usize,

    /// Run the DeepEP presets with each worker on a host of its own (a network namespace) behind a
    /// link of this rate in each direction (tbf on a veth pair), the client in this namespace; one
    /// run per rate, e.g. 1gbit,10gbit,25gbit. The report puts dispatch and combine beside the
    /// link's floor. Needs CAP_NET_ADMIN (root). Default: every process on loopback.
    #[arg(long, env = "SWITCHYARD_BENCH_LINK_RATE", value_delimiter = ',')]
    pub link_rate: Vec<LinkRate>,

    /// With --link-rate: the TCP congestion control of every host, the client's connections to the
    /// workers included: cubic (the kernel's default, what a cluster's hosts run unless tuned),
    /// bbr, dctcp, reno, or machine (this machine's own default). Named in the report.
    #[arg(long, env = "SWITCHYARD_BENCH_LINK_CONGESTION", default_value_t)]
    pub link_congestion: CongestionControl,

    /// MoE layers of the model of `--run step`.
    #[arg(long, env = "SWITCHYARD_BENCH_STEP_LAYERS", default_value_t = 32, value_parser = parse_count::<u32>)]
    pub step_layers: u32,

    /// Tokens per step of `--run step` (a decode step's batch).
    #[arg(long, env = "SWITCHYARD_BENCH_STEP_TOKENS", default_value_t = 8, value_parser = parse_count::<usize>)]
    pub step_tokens: usize,

    /// In `--run step`: the client waits this long before each MoE layer, standing in for
    /// attention computed elsewhere (e.g. 200us).
    #[arg(long, env = "SWITCHYARD_BENCH_ATTENTION_WAIT", value_parser = parse_duration, conflicts_with = "attention_gemm")]
    pub attention_wait: Option<Duration>,

    /// In `--run step`: the client computes [tokens, d_model] x [d_model, WIDTH] in f32 before each
    /// MoE layer, standing in for the attention block's projections.
    #[arg(long, env = "SWITCHYARD_BENCH_ATTENTION_GEMM")]
    pub attention_gemm: Option<usize>,

    /// Measured calls of each DeepEP preset (after a warm-up call on each connection to a worker).
    /// Five were too few to average out this machine's loopback (DeepEP-normal's combine 52-110% of
    /// TCP from run to run).
    #[arg(long, env = "SWITCHYARD_BENCH_PRESET_CALLS", default_value_t = 20, value_parser = parse_count::<u64>)]
    pub preset_calls: u64,

    /// Let the DeepEP presets' workers start on each request of a call as it arrives (a striped
    /// payload's first requests computed while the rest are on the wire), with --batch-wait-us as
    /// in the sweep. Default: each worker computes once the call's whole dispatch is in, so dispatch
    /// and combine are timed each alone, as DeepEP's tests time its kernels; on a machine short of
    /// cores, overlapped transfers share them with the stand-in compute.
    #[arg(long, env = "SWITCHYARD_BENCH_PRESET_OVERLAP")]
    pub preset_overlap: bool,

    /// Most measured time of each DeepEP preset.
    #[arg(long, env = "SWITCHYARD_BENCH_PRESET_TIME", default_value = "180s", value_parser = parse_positive_duration)]
    pub preset_time: Duration,

    /// Where experts compute: auto (CUDA if available, else CPU), cpu, cuda or cuda:N. The workers
    /// the bench starts and its in-process reference both compute there.
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,

    /// libtorch threads per worker; the in-process reference gets workers x this many.
    #[arg(long, env = "SWITCHYARD_WORKER_TORCH_THREADS", default_value_t = 1, value_parser = parse_count::<u32>)]
    pub worker_torch_threads: u32,

    /// The dtype experts hold their weights and compute in, on the workers and in the in-process
    /// reference alike. Default: bf16 on CUDA, f32 on CPU.
    #[arg(long, env = "SWITCHYARD_BENCH_DTYPE", value_enum)]
    pub dtype: Option<DtypeArg>,

    /// Workers' batch wait bound in microseconds (a step waits only while another request is on
    /// its way in; 0: never).
    #[arg(long, env = "SWITCHYARD_BATCH_WAIT_US", default_value_t = 0)]
    pub batch_wait_us: u64,

    /// Capacity factor of the sweep's models.
    #[arg(long, env = "SWITCHYARD_BENCH_CAPACITY_FACTOR", default_value_t = 1.25)]
    pub capacity_factor: f32,

    /// Expert form of the sweep's models.
    #[arg(long, env = "SWITCHYARD_BENCH_ACTIVATION", value_enum, default_value = "swiglu")]
    pub activation: ActivationArg,

    /// Run every connection of the measured clusters over mutual TLS, with a development CA
    /// written to a fresh folder and a certificate per process, as `switchyard local --tls` does
    /// (the wire baselines stay plaintext: they are the machine's limits).
    #[arg(long, env = "SWITCHYARD_BENCH_TLS")]
    pub tls: bool,

    /// Only redraw the SVG charts of the report folder --out from its report.json, then exit.
    #[arg(long, env = "SWITCHYARD_BENCH_REPLOT")]
    pub replot: bool,

    /// Repeats of each TCP and gRPC baseline.
    #[arg(long, env = "SWITCHYARD_BENCH_BASELINE_REPEATS", default_value_t = 10, value_parser = parse_count::<u32>)]
    pub baseline_repeats: u32,
}

/// What `switchyard bench` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunWhat {
    /// The sweep, then both DeepEP presets.
    All,
    /// The sweep of cluster shapes x tokens per call x wire dtypes.
    Sweep,
    /// Both DeepEP presets.
    Deepep,
    /// DeepEP's normal setting: 4096 tokens, hidden 7168, top-8 of 256 experts.
    DeepepNormal,
    /// DeepEP's low-latency setting: 128 tokens.
    DeepepLowLatency,
    /// A whole-model step: --step-layers MoE layers of the first cluster shape (--workers,
    /// --experts, --top-k, --dims), --step-tokens through all of them per call, distributed and
    /// in-process, split into communication, expert compute and client compute.
    Step,
}

impl RunWhat {
    fn sweep(self) -> bool {
        matches!(self, RunWhat::All | RunWhat::Sweep)
    }

    fn presets(self) -> Vec<Preset> {
        match self {
            RunWhat::All | RunWhat::Deepep => vec![Preset::DeepEpNormal, Preset::DeepEpLowLatency],
            RunWhat::Sweep | RunWhat::Step => Vec::new(),
            RunWhat::DeepepNormal => vec![Preset::DeepEpNormal],
            RunWhat::DeepepLowLatency => vec![Preset::DeepEpLowLatency],
        }
    }
}

fn parse_dims(text: &str) -> Result<(u32, u32), String> {
    let (d_model, d_ff) =
        text.split_once('x').ok_or_else(|| format!("--dims {text}: expected d_modelxd_ff, e.g. 512x1024"))?;
    let number = |value: &str| value.parse::<u32>().ok().filter(|n| *n > 0);
    match (number(d_model), number(d_ff)) {
        (Some(d_model), Some(d_ff)) => Ok((d_model, d_ff)),
        _ => Err(format!("--dims {text}: both sizes must be positive integers")),
    }
}

/// A development CA in a fresh folder, and this process's client certificate from it presented on
/// every connection it opens: the clusters' processes get theirs from the CA as they start.
fn development_tls() -> anyhow::Result<std::path::PathBuf> {
    use switchyard_common::tls::{self, ClientTls, Role};
    let dir = std::env::temp_dir().join(format!("switchyard-bench-certs-{}", std::process::id()));
    tls::write_dev_certs(&dir, &["localhost".to_owned(), "127.0.0.1".to_owned()], &[])?;
    tls::use_for_outgoing(ClientTls::load(tls::dev_files(&dir, Role::Client))?);
    eprintln!("mutual TLS on every connection of the clusters; certificates in {}", dir.display());
    Ok(dir)
}

/// What `args` asks to measure, and how; refused with the flag at fault.
fn settings_and_plan(args: &BenchArgs) -> anyhow::Result<(BenchSettings, BenchPlan)> {
    for (flag, empty) in [
        ("--tokens", args.tokens.is_empty()),
        ("--wire-dtypes", args.wire_dtypes.is_empty()),
        ("--workers", args.workers.is_empty()),
        ("--experts", args.experts.is_empty()),
        ("--top-k", args.top_k.is_empty()),
        ("--dims", args.dims.is_empty()),
    ] {
        anyhow::ensure!(!empty, "{flag} needs at least one value");
    }
    let me = std::env::current_exe().context("locating the switchyard binary")?;
    let dir = me.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let settings = BenchSettings {
        calls: args.calls,
        warmup_calls: args.warmup_calls,
        point_time: args.point_time,
        concurrency: args.concurrency,
        identity_experts: args.identity_experts,
        identity_hold: Duration::from_micros(args.identity_hold_us),
        grouped_experts: args.grouped_experts,
        worker_torch_threads: args.worker_torch_threads,
        device: args.device.resolve(),
        compute_dtype: args.dtype.map(Into::into),
        batch_wait_us: args.batch_wait_us,
        capacity_factor: args.capacity_factor,
        dispatch: args.dispatch.into(),
        connections_per_worker: args.connections_per_worker,
        chunked_dispatch: args.chunked_dispatch,
        model: ModelSpec { activation: args.activation.into(), ..ModelSpec::default_synthetic() },
        baseline_repeats: args.baseline_repeats,
        coordinator_bin: dir.join("switchyard-coordinator"),
        worker_bin: dir.join("switchyard-worker"),
        hosts: Hosts::Loopback,
        dev_tls: args.tls.then(development_tls).transpose()?,
    };
    let plan = BenchPlan {
        axes: Axes {
            tokens: args.tokens.clone(),
            wire_dtypes: args.wire_dtypes.iter().copied().map(Into::into).collect(),
            workers: args.workers.clone(),
            experts: args.experts.clone(),
            top_k: args.top_k.clone(),
            dims: args.dims.clone(),
        },
        grid: args.grid,
        sweep: args.run.sweep(),
        presets: args.run.presets(),
        preset_workers: args.preset_workers,
        preset_calls: args.preset_calls,
        preset_time: args.preset_time,
        preset_overlap: args.preset_overlap,
        link_rates: args.link_rate.clone(),
        link_congestion: args.link_congestion,
        step: (args.run == RunWhat::Step).then_some(StepPlan {
            layers: args.step_layers,
            tokens: args.step_tokens,
            attention: match (args.attention_wait, args.attention_gemm) {
                (Some(wait), _) => AttentionStandIn::Wait(wait),
                (None, Some(width)) => AttentionStandIn::Gemm { width },
                (None, None) => AttentionStandIn::None,
            },
        }),
    };
    Ok((settings, plan))
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.replot {
        for path in report::folder::replot(&args.out)? {
            eprintln!("wrote {}", path.display());
        }
        return Ok(());
    }
    let (settings, plan) = settings_and_plan(&args)?;
    report::folder::prepare(&args.out)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} points, {elapsed_precise} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = |done: usize, total: usize, line: &str| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        // A hidden bar (stderr is not a terminal) drops println: say it plainly instead.
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let report = bench::run(&plan, &settings, &progress).await?;
    bar.finish_and_clear();
    let command = std::env::args()
        .map(|arg| if arg.contains(' ') { format!("'{arg}'") } else { arg })
        .collect::<Vec<_>>()
        .join(" ");
    let summary = report.summary(&command);
    let written = report::folder::write(&summary, &args.out)?;
    print!("{}", report::markdown::bench_report(&summary));
    for path in written {
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use switchyard_model::{Activation, WeightDtype};
    use switchyard_proto::wire::WireDtype;
    use switchyard_router_client::DispatchLayout;

    use super::*;

    #[derive(Debug, Parser)]
    struct Bench {
        #[command(flatten)]
        args: BenchArgs,
    }

    /// What `switchyard bench` with `flags` would measure, and how.
    fn settings_and_plan_of(flags: &[&str]) -> (BenchSettings, BenchPlan) {
        let bench = Bench::try_parse_from(["bench"].iter().chain(flags)).expect("flags parse");
        settings_and_plan(&bench.args).expect("a plan")
    }

    #[test]
    fn a_zero_in_a_count_list_is_refused_naming_the_flag() {
        for flag in ["--tokens", "--workers", "--experts", "--top-k"] {
            let error = Bench::try_parse_from(["bench", flag, "4,0"]).expect_err("0 is refused").to_string();
            assert!(error.contains(&format!("'0' for '{flag}")) && error.contains("give at least 1"), "{error}");
        }
        for flag in ["--preset-workers", "--step-layers"] {
            assert!(Bench::try_parse_from(["bench", flag, "0"]).is_err(), "{flag} 0");
        }
        let bench = Bench::try_parse_from(["bench", "--tokens", "1,16"]).expect("positive");
        assert_eq!(bench.args.tokens, [1, 16]);
    }

    #[test]
    fn a_step_hold_comes_with_identity_experts() {
        let error = Bench::try_parse_from(["bench", "--identity-hold-us", "2000"]).expect_err("no identity experts");
        assert_eq!(error.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let bench = Bench::try_parse_from(["bench", "--identity-experts", "--identity-hold-us", "2000"])
            .expect("with identity experts");
        assert_eq!(bench.args.identity_hold_us, 2000);
    }

    #[test]
    fn the_presets_workers_wait_for_a_calls_whole_dispatch_unless_told_to_overlap() {
        let preset_wait = |flags: &[&str]| {
            let (settings, plan) = settings_and_plan_of(&[&["--run", "deepep"], flags].concat());
            assert_eq!(settings.batch_wait_us, 7, "the sweep keeps --batch-wait-us");
            bench::preset_settings(&settings, &plan, None).batch_wait_us
        };
        assert_eq!(preset_wait(&["--batch-wait-us", "7"]), bench::WHOLE_DISPATCH_WAIT.as_micros() as u64);
        assert_eq!(preset_wait(&["--batch-wait-us", "7", "--preset-overlap"]), 7);
    }

    #[test]
    fn the_warm_up_takes_every_connection_to_a_worker_once() {
        let warmup = |flags: &[&str]| {
            let (settings, plan) = settings_and_plan_of(&[&["--run", "deepep"], flags].concat());
            (bench::warmup_calls(&settings), bench::warmup_calls(&bench::preset_settings(&settings, &plan, None)))
        };
        // The presets make one warm-up call of their own, the sweep its --warmup-calls.
        assert_eq!(warmup(&["--connections-per-worker", "4", "--warmup-calls", "3"]), (4, 4));
        assert_eq!(warmup(&["--connections-per-worker", "2", "--warmup-calls", "3"]), (3, 2));
        assert_eq!(warmup(&["--connections-per-worker", "1", "--warmup-calls", "3"]), (3, 1));
        assert_eq!(warmup(&["--connections-per-worker", "4", "--warmup-calls", "0"]), (0, 0));
    }

    #[test]
    fn every_flag_reaches_what_the_bench_measures() {
        // Each flag that sets what is measured, none at its default (--attention-wait below).
        let flags = [
            "--run step --tokens 2,32 --wire-dtypes fp8 --dispatch expert-major",
            "--connections-per-worker 3 --chunked-dispatch true --workers 4 --experts 32 --top-k 1",
            "--dims 64x96 --grid --calls 9 --warmup-calls 5 --point-time 4s --concurrency 2",
            "--identity-experts --identity-hold-us 300 --grouped-experts --preset-workers 3",
            "--link-rate 1gbit --link-congestion bbr --step-layers 6 --step-tokens 12",
            "--attention-gemm 256 --preset-calls 4 --preset-overlap --preset-time 30s",
            "--worker-torch-threads 2 --dtype bf16 --batch-wait-us 40 --capacity-factor 2.5",
            "--activation gelu --baseline-repeats 6",
        ]
        .join(" ");
        let (settings, plan) = settings_and_plan_of(&flags.split_whitespace().collect::<Vec<_>>());
        assert_eq!((settings.calls, settings.warmup_calls, settings.point_time), (9, 5, Duration::from_secs(4)));
        assert_eq!((settings.concurrency, settings.identity_experts), (2, true));
        assert_eq!((settings.identity_hold, settings.grouped_experts), (Duration::from_micros(300), true));
        assert_eq!((settings.worker_torch_threads, settings.compute_dtype), (2, Some(WeightDtype::Bf16)));
        assert_eq!((settings.batch_wait_us, settings.capacity_factor), (40, 2.5));
        assert_eq!(settings.dispatch, DispatchLayout::ExpertMajor);
        assert_eq!((settings.connections_per_worker, settings.chunked_dispatch), (3, true));
        assert_eq!((settings.model.activation, settings.baseline_repeats), (Activation::Gelu, 6));
        assert_eq!(
            (settings.device, settings.hosts, settings.dev_tls.is_some()),
            (tch::Device::Cpu, Hosts::Loopback, false)
        );

        let axes = &plan.axes;
        assert_eq!((&axes.tokens[..], &axes.wire_dtypes[..]), (&[2, 32][..], &[WireDtype::Fp8E4m3][..]));
        assert_eq!((&axes.workers[..], &axes.experts[..], &axes.top_k[..]), (&[4][..], &[32][..], &[1][..]));
        assert_eq!(axes.dims, [(64, 96)]);
        assert!(plan.grid && !plan.sweep && plan.presets.is_empty(), "--run step measures the step alone");
        assert_eq!((plan.preset_workers, plan.preset_calls, plan.preset_time), (3, 4, Duration::from_secs(30)));
        assert!(plan.preset_overlap);
        assert_eq!(plan.link_rates, ["1gbit".parse::<LinkRate>().expect("a rate")]);
        assert_eq!(plan.link_congestion, CongestionControl::Bbr);
        let step = plan.step.expect("--run step plans a step");
        assert_eq!((step.layers, step.tokens), (6, 12));
        assert!(matches!(step.attention, AttentionStandIn::Gemm { width: 256 }), "{:?}", step.attention);
        let (_, all) = settings_and_plan_of(&[]);
        assert!(all.sweep && all.step.is_none(), "the sweep by default");
        assert_eq!(all.presets, [Preset::DeepEpNormal, Preset::DeepEpLowLatency], "then both presets");
        let (_, one) = settings_and_plan_of(&["--run", "deepep-low-latency"]);
        assert!(!one.sweep && one.presets == [Preset::DeepEpLowLatency], "{:?}", one.presets);
        let (_, plan) = settings_and_plan_of(&["--run", "step", "--attention-wait", "2ms"]);
        let attention = plan.step.expect("a step").attention;
        assert!(matches!(attention, AttentionStandIn::Wait(wait) if wait == Duration::from_millis(2)), "{attention:?}");
    }
}
