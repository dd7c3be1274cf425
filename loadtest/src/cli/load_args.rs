//! Load flags shared by `switchyard loadtest` and `switchyard local --loadtest`.

use std::time::Duration;

use switchyard_loadtest::loadtest::{
    Arrival, AttentionStandIn, DEFAULT_MAX_IN_FLIGHT, LoadSpec, LoadSummary, ModelStep, RunInfo, Thresholds,
};
use switchyard_loadtest::report;
use switchyard_loadtest::skew::Skew;
use switchyard_model::{CapacityPolicy, ModelSpec};
use switchyard_router_client::routing::{GroupLimited, RoutingPolicy};
use switchyard_router_client::{ClientOptions, RoutingOverrides, RoutingTableView};

use super::values::{self, DispatchArg, OverflowArg, PolicyName, RefusalArg, WireDtypeArg};
use switchyard_router_client::client::DEFAULT_THROTTLE_RATIO;
use switchyard_router_client::transport::default_connections;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Concurrent callers, each in a closed loop (the next call starts when the last one answered).
    #[arg(long, env = "SWITCHYARD_LOAD_CONCURRENCY", default_value_t = 4, value_parser = values::parse_count::<usize>)]
    pub concurrency: usize,
    /// Open loop: start calls at this many per second (Poisson arrivals), whatever the answers'
    /// pace; latency counts from each call's scheduled start. Without it: closed loop.
    #[arg(long, env = "SWITCHYARD_LOAD_RATE", value_parser = values::parse_positive::<f64>)]
    pub rate: Option<f64>,
    /// Open loop ramping through stages instead of one rate, e.g. 10s:50,30s:200,10s:0: the rate
    /// moves linearly from the previous stage's target (0 at first) to each stage's target, in
    /// calls per second, over its duration (k6's stages). The stages are the whole measured run:
    /// --duration and --warmup do not apply.
    #[arg(long, env = "SWITCHYARD_LOAD_STAGES", value_parser = values::parse_stages, conflicts_with = "rate")]
    pub stages: Option<values::StagesArg>,
    /// Measured time, e.g. 10s, 500ms, 2m (after the warm-up).
    #[arg(long, env = "SWITCHYARD_LOAD_DURATION", default_value = "10s", value_parser = values::parse_positive_duration)]
    pub duration: Duration,
    /// Stop after this many measured calls, if that comes before the duration.
    #[arg(long, env = "SWITCHYARD_LOAD_REQUESTS", value_parser = values::parse_count::<u64>)]
    pub requests: Option<u64>,
    /// Tokens per layer call.
    #[arg(long, env = "SWITCHYARD_LOAD_TOKENS", default_value_t = 64, value_parser = values::parse_count::<usize>)]
    pub tokens: usize,
    /// MoE layer the calls go to, numbered as the checkpoint numbers it (default: the first MoE
    /// layer); `all`, or a list (e.g. 1,3,5), makes each call a whole-model step through those MoE
    /// layers in order, reported per step and split into communication, expert compute and client
    /// compute.
    #[arg(long, env = "SWITCHYARD_LOAD_LAYER", value_parser = values::parse_layer)]
    pub layer: Option<values::LayerArg>,
    /// In a whole-model step: the client waits this long before each MoE layer, standing in for an
    /// attention block computed elsewhere (e.g. 200us).
    #[arg(long, env = "SWITCHYARD_LOAD_ATTENTION_WAIT", value_parser = values::parse_duration, conflicts_with = "attention_gemm")]
    pub attention_wait: Option<Duration>,
    /// In a whole-model step: the client computes a [tokens, d_model] x [d_model, WIDTH] f32 GEMM
    /// before each MoE layer, standing in for the attention block's projections (e.g. 4 x d_model).
    #[arg(long, env = "SWITCHYARD_LOAD_ATTENTION_GEMM", value_parser = values::parse_count::<usize>)]
    pub attention_gemm: Option<usize>,
    /// Unmeasured warm-up before the measured time.
    #[arg(long, env = "SWITCHYARD_LOAD_WARMUP", default_value = "1s", value_parser = values::parse_duration)]
    pub warmup: Duration,
    /// Seed of the generated hidden states.
    #[arg(long, env = "SWITCHYARD_LOAD_SEED", default_value_t = 1)]
    pub input_seed: u64,
    /// Capacity factor of the calls (default: the model's).
    #[arg(long = "call-capacity-factor", env = "SWITCHYARD_LOAD_CAPACITY_FACTOR", value_parser = values::parse_positive::<f32>)]
    pub call_capacity_factor: Option<f32>,
    /// Route with another policy than the model's own router (the default).
    #[arg(long, env = "SWITCHYARD_POLICY", value_enum)]
    pub policy: Option<PolicyName>,
    /// Experts per token for the token-choice policies of --policy (default: the model's top-k).
    #[arg(long, env = "SWITCHYARD_ROUTE_TOP_K", requires = "policy")]
    pub route_top_k: Option<usize>,
    /// What happens past an expert's capacity.
    #[arg(long, env = "SWITCHYARD_OVERFLOW", value_enum, default_value = "drop")]
    pub overflow: OverflowArg,
    /// Seed of noisy top-k's noise (noise is off unless --policy noisy-top-k).
    #[arg(long, env = "SWITCHYARD_NOISE_SEED", default_value_t = 0)]
    pub noise_seed: u64,
    /// group-limited: expert groups, and how many of them each token may use.
    #[arg(long, env = "SWITCHYARD_EXPERT_GROUPS", default_value_t = 4)]
    pub expert_groups: usize,
    #[arg(long, env = "SWITCHYARD_TOP_GROUPS", default_value_t = 2)]
    pub top_groups: usize,
    /// soft-moe: slots per expert.
    #[arg(long, env = "SWITCHYARD_SOFT_SLOTS", default_value_t = 1)]
    pub slots: usize,
    /// group-limited: routed_scaling_factor.
    #[arg(long, env = "SWITCHYARD_ROUTED_SCALING", default_value_t = 1.0, value_parser = values::parse_positive::<f32>)]
    pub routed_scaling: f32,
    /// Hot experts: uniform, zipf:S (expert e gets tokens ∝ 1/(e+1)^S), hot-worker (every token
    /// to the first worker's experts; a cluster only) or rotating:PERIOD (one hot expert, the next
    /// every PERIOD, e.g. rotating:2s).
    #[arg(long, env = "SWITCHYARD_LOAD_SKEW", default_value = "uniform", value_parser = parse_skew)]
    pub skew: SkewArg,
    /// Also write every figure as JSON to this file (an array: one object per report).
    /// Open loop (--rate): calls in flight at most; arrivals past it are dropped and counted (the
    /// report's "dropped arrivals"), so an overloaded cluster cannot grow the load tester.
    #[arg(long, env = "SWITCHYARD_LOAD_MAX_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT, value_parser = values::parse_count::<usize>)]
    pub max_in_flight: usize,

    /// Deadline of every call's requests to the workers (e.g. 5s): an open loop's calls still out
    /// when its window ends are answered or failed within it.
    #[arg(long, env = "SWITCHYARD_LOAD_TIMEOUT", default_value = "30s", value_parser = values::parse_positive_duration)]
    pub timeout: Duration,

    /// Exit non-zero when more than this fraction of measured calls failed (e.g. 0.01). A run in
    /// which every call failed always exits non-zero.
    #[arg(long, env = "SWITCHYARD_LOAD_MAX_ERROR_RATE", value_parser = values::parse_fraction)]
    pub max_error_rate: Option<f64>,

    /// Exit non-zero when the measured p99 latency is above this (e.g. 250ms).
    #[arg(long, env = "SWITCHYARD_LOAD_MAX_P99", value_parser = values::parse_duration)]
    pub max_p99: Option<Duration>,

    #[arg(long, env = "SWITCHYARD_LOAD_JSON")]
    pub json: Option<std::path::PathBuf>,
    /// Also write every figure as CSV to this file (a header, then one row per report).
    #[arg(long, env = "SWITCHYARD_LOAD_CSV")]
    pub csv: Option<std::path::PathBuf>,
    /// Element type of rows on the wire.
    #[arg(long, env = "SWITCHYARD_WIRE_DTYPE", value_enum, default_value = "f32")]
    pub wire_dtype: WireDtypeArg,
    /// How rows travel to the workers.
    #[arg(long, env = "SWITCHYARD_DISPATCH", value_enum, default_value = "token-major")]
    pub dispatch: DispatchArg,
    /// HTTP/2 connections to each worker; a large payload is spread over them in shares of at
    /// least 4 MiB (default: one per core, up to 8).
    #[arg(long, env = "SWITCHYARD_CONNECTIONS_PER_WORKER", default_value_t = default_connections(), value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub connections_per_worker: usize,
    /// Send a large payload to one worker as a stream of ~4 MiB chunks the worker computes on as
    /// they arrive (default: each connection's share as one request, faster where cores are few).
    #[arg(long, env = "SWITCHYARD_CHUNKED_DISPATCH", default_value_t = false, action = clap::ArgAction::Set)]
    pub chunked_dispatch: bool,
    /// What a full expert queue means when no other worker holds the expert: fail the call; let
    /// the refused assignments overflow (those tokens keep their residual path, as past an
    /// expert's capacity; counted in the report); or send each to its token's next-best expert
    /// on a worker with room (counted as re-routed).
    #[arg(long, env = "SWITCHYARD_ON_REFUSAL", value_enum, default_value = "fail")]
    pub on_refusal: RefusalArg,
    /// Adaptive throttling: requests a worker may be sent per request it accepted over the last
    /// 10 s; past that the client sends its rows to other holders of their experts (replicas),
    /// or refuses the call itself (RESOURCE_EXHAUSTED, "throttled"), sending nothing, so an
    /// overloaded cluster spends its cores on calls that succeed. 0: off.
    #[arg(long, env = "SWITCHYARD_THROTTLE_RATIO", default_value_t = DEFAULT_THROTTLE_RATIO, value_parser = values::parse_throttle_ratio)]
    pub throttle_ratio: f64,
    /// The longest one attempt at a worker may take before its rows go to another holder of their
    /// experts (e.g. 500ms); unset: the whole call deadline. Routes around a stalled worker when
    /// experts are replicated.
    #[arg(long, env = "SWITCHYARD_ATTEMPT_TIMEOUT", value_parser = values::parse_duration)]
    pub attempt_timeout: Option<Duration>,
    /// How long to wait for the coordinator to place every expert (workers registering and
    /// loading their experts) before giving up; the wait says how far placement has got.
    #[arg(long, env = "SWITCHYARD_PLACEMENT_TIMEOUT", default_value = "2m", value_parser = values::parse_positive_duration)]
    pub placement_timeout: Duration,
}

impl LoadArgs {
    /// `--throttle-ratio` as the client takes it.
    pub fn throttle(&self) -> Option<f64> {
        (self.throttle_ratio > 0.0).then_some(self.throttle_ratio)
    }

    /// What the run measures, for its opening line.
    pub fn window(&self) -> String {
        match &self.stages {
            Some(stages) => format!(
                "ramping through {} calls/s, no warm-up",
                switchyard_loadtest::loadtest::describe_stages(&stages.0)
            ),
            None => format!("{} s measured after {} s warm-up", self.duration.as_secs_f64(), self.warmup.as_secs_f64()),
        }
    }

    /// The MoE layer the calls go to (a step's first): `--layer`, or the model's first MoE layer.
    pub fn layer(&self, model: &ModelSpec) -> u32 {
        match &self.layer {
            Some(values::LayerArg::One(layer)) => *layer,
            Some(values::LayerArg::List(layers)) => layers.first().copied().unwrap_or_else(|| model.first_layer()),
            Some(values::LayerArg::All) | None => model.first_layer(),
        }
    }

    /// Fails when `--layer` names a layer that is not one of `model`'s MoE layers, before any call
    /// (each would fail otherwise).
    pub fn check_layers(&self, model: &ModelSpec) -> anyhow::Result<()> {
        let layers = self.step(model).map_or_else(|| vec![self.layer(model)], |step| step.layers);
        match layers.iter().find(|layer| model.layer_index(**layer).is_none()) {
            Some(layer) => {
                anyhow::bail!(
                    "--layer {layer}: not a MoE layer of {}, whose MoE layers are {}",
                    model.name,
                    model.describe_layers()
                )
            }
            None => Ok(()),
        }
    }

    /// The whole-model step each call runs, when `--layer` names several layers or `all`, or an
    /// attention stand-in is asked for (a step of one layer then).
    pub fn step(&self, model: &ModelSpec) -> Option<ModelStep> {
        let attention = match (self.attention_wait, self.attention_gemm) {
            (Some(wait), _) => AttentionStandIn::Wait(wait),
            (None, Some(width)) => AttentionStandIn::Gemm { width },
            (None, None) => AttentionStandIn::None,
        };
        let layers = match &self.layer {
            Some(values::LayerArg::All) => model.moe_layers.clone(),
            Some(values::LayerArg::List(layers)) => layers.clone(),
            _ if attention != AttentionStandIn::None => vec![self.layer(model)],
            Some(values::LayerArg::One(_)) | None => return None,
        };
        Some(ModelStep { layers, attention })
    }

    /// The load on `model`, without routing (see [`LoadArgs::routing`]).
    pub fn spec(&self, model: &ModelSpec) -> LoadSpec {
        LoadSpec {
            concurrency: self.concurrency,
            arrival: match (&self.stages, self.rate) {
                (Some(stages), _) => Arrival::Ramp { stages: stages.0.clone() },
                (None, Some(rate)) => Arrival::Open { rate },
                (None, None) => Arrival::Closed,
            },
            duration: self.duration,
            requests: self.requests,
            tokens_per_call: self.tokens,
            layer: self.layer(model),
            step: self.step(model),
            warmup: self.warmup,
            seed: self.input_seed,
            routing: RoutingOverrides::default(),
            progress: true,
            skew: Skew::Uniform,
            max_in_flight: self.max_in_flight,
        }
    }

    /// The client these flags ask for, routing as `routing` says.
    pub fn client_options(&self, routing: RoutingOverrides) -> ClientOptions {
        ClientOptions {
            wire_dtype: self.wire_dtype.into(),
            dispatch: self.dispatch.into(),
            connections_per_worker: self.connections_per_worker,
            chunked_dispatch: self.chunked_dispatch,
            refusal: self.on_refusal.into(),
            attempt_timeout: self.attempt_timeout,
            timeout: self.timeout,
            throttle_ratio: self.throttle(),
            routing,
            ..ClientOptions::default()
        }
    }

    /// What the run must meet to exit zero.
    pub fn thresholds(&self) -> Thresholds {
        Thresholds { max_error_rate: self.max_error_rate, max_p99: self.max_p99 }
    }

    /// Records how the run was made in `summaries`, writes them to the --json and --csv files if
    /// asked, then fails if the first (the cluster's) crossed a threshold or failed every call.
    pub fn finish(&self, mut summaries: Vec<LoadSummary>, model: &ModelSpec) -> anyhow::Result<()> {
        let run = RunInfo {
            command_line: std::env::args().collect(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            input_seed: self.input_seed,
            model: model.summary(),
        };
        for summary in &mut summaries {
            summary.run = run.clone();
        }
        self.write_reports(&summaries)?;
        let crossed = summaries.first().map(|summary| summary.crossed(self.thresholds())).unwrap_or_default();
        if !crossed.is_empty() {
            anyhow::bail!("the load test failed: {}", crossed.join("; "));
        }
        Ok(())
    }

    /// Fails before any call when a --json or --csv file could not be written once the run is
    /// over (a missing folder, no permission), rather than after a long run; a file that was not
    /// there is not left behind.
    pub fn check_report_paths(&self) -> anyhow::Result<()> {
        use anyhow::Context;
        for path in self.json.iter().chain(&self.csv) {
            let existed = path.exists();
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .with_context(|| format!("{} could not be written", path.display()))?;
            if !existed {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(())
    }

    /// Writes `summaries` to the --json and --csv files, if asked.
    fn write_reports(&self, summaries: &[LoadSummary]) -> anyhow::Result<()> {
        use anyhow::Context;
        if let Some(path) = &self.json {
            std::fs::write(path, serde_json::to_string_pretty(summaries)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &self.csv {
            std::fs::write(path, report::csv::load_reports(summaries))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// The routing these flags ask for on `model`: its own router unless --policy names another.
    pub fn routing(&self, model: &ModelSpec) -> anyhow::Result<RoutingOverrides> {
        let (model_top_k, experts) = (model.top_k, model.experts_per_layer);
        let overrides = RoutingOverrides {
            policy: None,
            overflow: Some(self.overflow.into()),
            capacity: self.call_capacity_factor.map(CapacityPolicy::Factor),
            sequence_tokens: None,
        };
        let Some(policy) = self.policy else {
            return Ok(overrides);
        };
        let k = self.route_top_k.unwrap_or(model_top_k as usize);
        anyhow::ensure!(
            (1..=experts as usize).contains(&k),
            "--route-top-k {k} must be between 1 and the model's {experts} experts"
        );
        let policy = match policy {
            PolicyName::TopK => RoutingPolicy::TopK { k, renormalize: true },
            PolicyName::TopKSoftmax => RoutingPolicy::TopK { k, renormalize: false },
            PolicyName::NoisyTopK => RoutingPolicy::NoisyTopK { k, seed: self.noise_seed },
            PolicyName::Dense => RoutingPolicy::Dense,
            PolicyName::ExpertChoice => RoutingPolicy::ExpertChoice,
            PolicyName::SoftMoe => {
                anyhow::ensure!(self.slots > 0, "--slots must be positive");
                RoutingPolicy::SoftMoe { slots: self.slots }
            }
            PolicyName::GroupLimited => {
                let (groups, top_groups) = (self.expert_groups, self.top_groups);
                anyhow::ensure!(
                    groups > 0 && (experts as usize).is_multiple_of(groups),
                    "--expert-groups {groups} must divide the model's {experts} experts"
                );
                anyhow::ensure!(
                    (1..=groups).contains(&top_groups) && k <= top_groups * (experts as usize / groups),
                    "--top-groups {top_groups} must be in 1..={groups} and hold at least k = {k} experts"
                );
                RoutingPolicy::GroupLimited(GroupLimited {
                    scaling: self.routed_scaling,
                    ..GroupLimited::deepseek_v3(k, groups, top_groups)
                })
            }
        };
        Ok(RoutingOverrides { policy: Some(policy), ..overrides })
    }
}

/// The --skew flag, before `hot-worker` is resolved against a routing table.
#[derive(Debug, Clone, PartialEq)]
pub enum SkewArg {
    Skew(Skew),
    HotWorker,
}

impl SkewArg {
    /// The skew, with `hot-worker` meaning the experts of `layer` that the table's first worker serves.
    pub fn resolve(&self, table: Option<&RoutingTableView>, layer: u32) -> anyhow::Result<Skew> {
        match self {
            SkewArg::Skew(skew) => Ok(skew.clone()),
            SkewArg::HotWorker => {
                let table =
                    table.ok_or_else(|| anyhow::anyhow!("--skew hot-worker needs a cluster, not --reference"))?;
                let first = table
                    .workers()
                    .first()
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("the routing table has no worker"))?;
                let experts = (0..table.model.experts_per_layer)
                    .filter(|e| table.endpoints(layer, *e).first() == Some(&first))
                    .collect();
                Ok(Skew::HotExperts(experts))
            }
        }
    }
}

pub fn parse_skew(text: &str) -> Result<SkewArg, String> {
    if text == "uniform" {
        return Ok(SkewArg::Skew(Skew::Uniform));
    }
    if text == "hot-worker" {
        return Ok(SkewArg::HotWorker);
    }
    if let Some(exponent) = text.strip_prefix("zipf:") {
        let exponent: f64 = exponent.parse().map_err(|_| format!("--skew {text}: zipf:S needs a number S"))?;
        if !(exponent >= 0.0 && exponent.is_finite()) {
            return Err(format!("--skew {text}: zipf:S needs a finite S of at least 0 (0: uniform)"));
        }
        return Ok(SkewArg::Skew(Skew::Zipf { exponent }));
    }
    if let Some(period) = text.strip_prefix("rotating:") {
        let period = values::parse_positive_duration(period).map_err(|error| format!("--skew {text}: {error}"))?;
        return Ok(SkewArg::Skew(Skew::Rotating { period }));
    }
    Err(format!("unknown skew '{text}' (use uniform, zipf:S, hot-worker or rotating:PERIOD)"))
}

#[cfg(test)]
mod tests {
    use switchyard_loadtest::loadtest::LoadReport;
    use switchyard_proto::wire::WireDtype;
    use switchyard_router_client::{DispatchLayout, RefusalPolicy};

    use super::*;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        load: LoadArgs,
    }

    /// The load flags `flags` give (defaults for the rest).
    fn load_args(flags: &[&str]) -> LoadArgs {
        use clap::Parser;
        Flags::try_parse_from(std::iter::once("flags").chain(flags.iter().copied())).expect("flags parse").load
    }

    fn two_layers() -> ModelSpec {
        ModelSpec { moe_layers: vec![1, 3], ..ModelSpec::default_synthetic() }
    }

    #[test]
    fn a_layer_the_model_does_not_have_is_refused_naming_it() {
        let model = two_layers();
        let check = |layer: &str| load_args(&["--layer", layer]).check_layers(&model);
        for fine in ["1", "3", "all", "3,1"] {
            assert!(check(fine).is_ok(), "{fine}");
        }
        for (bad, named) in [("2", 2), ("1,5", 5)] {
            let error = check(bad).expect_err("refused").to_string();
            assert!(error.starts_with(&format!("--layer {named}: not a MoE layer of")), "{error}");
        }
    }

    #[test]
    fn skews_parse() {
        assert_eq!(parse_skew("zipf:1.5"), Ok(SkewArg::Skew(Skew::Zipf { exponent: 1.5 })));
        assert_eq!(parse_skew("rotating:2s"), Ok(SkewArg::Skew(Skew::Rotating { period: Duration::from_secs(2) })));
        assert_eq!(parse_skew("hot-worker"), Ok(SkewArg::HotWorker));
        assert!(parse_skew("zipf:x").unwrap_err().contains("zipf:S"));
        for bad in ["zipf:nan", "zipf:-1", "zipf:inf"] {
            assert!(parse_skew(bad).unwrap_err().contains("finite S of at least 0"), "{bad}");
        }
        assert!(parse_skew("rotating:0s").unwrap_err().contains("positive duration"));
    }

    /// Each client flag reaches the client (a flag dropped on the way would run the default
    /// silently: an f32 wire for `--wire-dtype bf16`).
    #[test]
    fn the_client_flags_make_the_client_s_options() {
        let load = load_args(&[
            "--wire-dtype",
            "bf16",
            "--dispatch",
            "expert-major",
            "--connections-per-worker",
            "3",
            "--chunked-dispatch",
            "true",
            "--on-refusal",
            "next-best",
            "--attempt-timeout",
            "500ms",
            "--timeout",
            "5s",
            "--throttle-ratio",
            "1.5",
        ]);
        let routing = RoutingOverrides { sequence_tokens: Some(16), ..RoutingOverrides::default() };
        let options = load.client_options(routing);
        assert_eq!(
            (options.wire_dtype, options.dispatch, options.connections_per_worker, options.chunked_dispatch),
            (WireDtype::Bf16, DispatchLayout::ExpertMajor, 3, true)
        );
        assert_eq!(
            (options.refusal, options.attempt_timeout, options.timeout, options.throttle_ratio),
            (RefusalPolicy::NextBest, Some(Duration::from_millis(500)), Duration::from_secs(5), Some(1.5))
        );
        assert_eq!(options.routing, routing);
    }

    #[test]
    fn a_throttle_ratio_of_zero_turns_throttling_off() {
        assert_eq!(load_args(&[]).throttle(), Some(DEFAULT_THROTTLE_RATIO));
        assert_eq!(load_args(&["--throttle-ratio", "4"]).throttle(), Some(4.0));
        assert_eq!(load_args(&["--throttle-ratio", "0"]).throttle(), None);
    }

    #[test]
    fn the_opening_line_says_what_is_measured() {
        assert_eq!(load_args(&["--duration", "3s", "--warmup", "500ms"]).window(), "3 s measured after 0.5 s warm-up");
        assert_eq!(load_args(&["--stages", "2s:10,1s:20"]).window(), "ramping through 2s:10,1s:20 calls/s, no warm-up");
    }

    #[test]
    fn several_layers_or_an_attention_stand_in_make_each_call_a_step() {
        let model = two_layers();
        assert_eq!(load_args(&[]).step(&model), None, "one layer, nothing else: a plain call");
        assert_eq!(load_args(&["--layer", "3"]).step(&model), None);
        let step = |flags: &[&str]| load_args(flags).step(&model).expect("a step");
        let waiting = step(&["--attention-wait", "2ms"]);
        assert_eq!(waiting.layers, [1], "the model's first MoE layer");
        assert_eq!(waiting.attention, AttentionStandIn::Wait(Duration::from_millis(2)));
        let computing = step(&["--layer", "3", "--attention-gemm", "256"]);
        assert_eq!((computing.layers, computing.attention), (vec![3], AttentionStandIn::Gemm { width: 256 }));
        let whole = step(&["--layer", "all"]);
        assert_eq!((whole.layers, whole.attention), (vec![1, 3], AttentionStandIn::None));
        assert_eq!(load_args(&["--layer", "all"]).spec(&model).step.map(|step| step.layers), Some(vec![1, 3]));
    }

    #[test]
    fn a_run_that_crosses_a_threshold_fails_after_writing_its_reports() {
        let folder = tempfile::tempdir().expect("a folder");
        let (json, csv) = (folder.path().join("run.json"), folder.path().join("run.csv"));
        let (json_flag, csv_flag) = (json.to_string_lossy().into_owned(), csv.to_string_lossy().into_owned());
        let args =
            load_args(&["--max-error-rate", "0.1", "--max-p99", "5ms", "--json", &json_flag, "--csv", &csv_flag]);
        let limits = args.thresholds();
        assert_eq!((limits.max_error_rate, limits.max_p99), (Some(0.1), Some(Duration::from_millis(5))));

        let model = two_layers();
        let mut report = LoadReport::empty("cluster", &args.spec(&model));
        report.errors.insert("Unavailable".into(), 3);
        let error = args.finish(vec![report.summary()], &model).expect_err("every call failed").to_string();
        assert!(error.contains("every call failed (3 of 3)") && error.contains("--max-error-rate 0.1"), "{error}");
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON report")).expect("JSON");
        assert_eq!(written[0]["failed"], 3);
        assert_eq!(written[0]["run"]["input_seed"], 1, "how the run was made is recorded");
        assert!(std::fs::read_to_string(&csv).expect("the CSV report").starts_with("target,"));

        report.errors.clear();
        report.calls = 10;
        assert!(args.finish(vec![report.summary()], &model).is_ok(), "no failure, no latency above 5 ms");
    }

    #[test]
    fn routing_flags_name_the_policy_and_its_settings() {
        let model = ModelSpec { experts_per_layer: 8, top_k: 2, ..ModelSpec::default_synthetic() };
        let routing = |flags: &[&str]| load_args(flags).routing(&model);
        let plain = routing(&["--call-capacity-factor", "1.5"]).expect("the model's own router");
        assert_eq!(plain.policy, None);
        assert_eq!(plain.capacity, Some(CapacityPolicy::Factor(1.5)));
        let policy = |flags: &[&str]| routing(flags).expect("a policy").policy.expect("named");
        assert_eq!(policy(&["--policy", "top-k"]), RoutingPolicy::TopK { k: 2, renormalize: true });
        assert_eq!(
            policy(&["--policy", "top-k-softmax", "--route-top-k", "3"]),
            RoutingPolicy::TopK { k: 3, renormalize: false }
        );
        assert_eq!(
            policy(&["--policy", "noisy-top-k", "--noise-seed", "9"]),
            RoutingPolicy::NoisyTopK { k: 2, seed: 9 }
        );
        let RoutingPolicy::GroupLimited(limited) = policy(&[
            "--policy",
            "group-limited",
            "--expert-groups",
            "4",
            "--top-groups",
            "2",
            "--routed-scaling",
            "2.5",
        ]) else {
            panic!("group-limited");
        };
        assert_eq!((limited.k, limited.groups, limited.top_groups, limited.scaling), (2, 4, 2, 2.5));
        for (flags, named) in [
            (&["--policy", "top-k", "--route-top-k", "9"][..], "--route-top-k 9"),
            (&["--policy", "group-limited", "--expert-groups", "3"], "--expert-groups 3"),
        ] {
            let error = routing(flags).expect_err("refused").to_string();
            assert!(error.starts_with(named), "{error}");
        }
    }

    #[test]
    fn a_hot_worker_is_the_table_s_first_and_needs_a_table() {
        let model = ModelSpec { experts_per_layer: 4, ..two_layers() };
        let table = RoutingTableView::single_worker(model, "http://w0:50051", 64);
        assert_eq!(SkewArg::HotWorker.resolve(Some(&table), 1).expect("resolved"), Skew::HotExperts(vec![0, 1, 2, 3]));
        let refused = SkewArg::HotWorker.resolve(None, 1).expect_err("no table").to_string();
        assert!(refused.contains("--skew hot-worker needs a cluster"), "{refused}");
        let zipf = SkewArg::Skew(Skew::Zipf { exponent: 1.0 });
        assert_eq!(zipf.resolve(None, 1).expect("as given"), Skew::Zipf { exponent: 1.0 });
    }
}
