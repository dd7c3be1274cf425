//! The load-test engine behind `switchyard loadtest` and `switchyard local --loadtest`: N concurrent
//! callers in a closed loop (or an open loop on a Poisson schedule) against the distributed layer or
//! the in-process reference, a warm-up that is not measured, and the tallies of a [`LoadReport`]:
//! latency (HDR histograms), errors by gRPC code, overflow, bytes, the time breakdown and the
//! ledger. `summary` turns them into figures; [`crate::report`] renders those.

mod step;
mod summary;

pub use step::{AttentionStandIn, ModelStep, StepSplit};
pub use summary::{LoadSummary, PhaseFigures, RunInfo, Thresholds, describe_stages};

use step::{PreparedStandIn, ResidualStream};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

use crate::skew::{Inputs, Skew, gate_rows};
use switchyard_model::ModelSpec;
use switchyard_router_client::client::MoeClient;
use switchyard_router_client::error::ClientError;
pub use switchyard_router_client::layer::InProcessLayer;
use switchyard_router_client::ledger::{CommLedger, WorkerCall};
use switchyard_router_client::router::{RoutingOverrides, RoutingSummary};
use switchyard_router_client::stats::RouterStats;
use switchyard_router_client::timing::{ByteCounts, TimeBreakdown};

/// What load to apply.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Closed-loop callers (ignored by an open-loop [`Arrival`]).
    pub concurrency: usize,
    pub arrival: Arrival,
    /// Measured time, after the warm-up. The test ends at whichever of duration and requests comes first.
    pub duration: Duration,
    /// Most measured calls in total.
    pub requests: Option<u64>,
    pub tokens_per_call: usize,
    /// The MoE layer each call runs through (the first of a step's: its gate shapes the inputs).
    pub layer: u32,
    /// Each call a whole-model step through these layers instead of `layer` alone.
    pub step: Option<ModelStep>,
    pub warmup: Duration,
    /// Seed of the generated hidden states.
    pub seed: u64,
    pub routing: RoutingOverrides,
    /// Show a live progress line on stderr (hidden when stderr is not a terminal).
    pub progress: bool,
    /// Which experts the generated inputs make hot.
    pub skew: Skew,
    /// Open loop: calls in flight at most; an arrival past it is dropped and counted, not queued
    /// (the load tester itself must not grow without bound when the cluster falls behind).
    pub max_in_flight: usize,
}

/// Open loop's default cap on calls in flight.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

impl LoadSpec {
    /// `requests` calls of `tokens` to layer 0 by `concurrency` closed-loop callers, for at most
    /// `duration`, without a warm-up, progress line or skew: a measurement's plain load.
    pub fn closed_loop(concurrency: usize, duration: Duration, tokens: usize, requests: u64, seed: u64) -> Self {
        Self {
            concurrency: concurrency.max(1),
            arrival: Arrival::Closed,
            duration,
            requests: Some(requests),
            tokens_per_call: tokens,
            layer: 0,
            step: None,
            warmup: Duration::ZERO,
            seed,
            routing: RoutingOverrides::default(),
            progress: false,
            skew: Skew::Uniform,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// Adds `loads` (per expert) into `totals` element by element, growing `totals` to fit.
fn add_loads<T: Copy + Into<u64>>(totals: &mut Vec<u64>, loads: &[T]) {
    if totals.len() < loads.len() {
        totals.resize(loads.len(), 0);
    }
    for (total, load) in totals.iter_mut().zip(loads) {
        *total += (*load).into();
    }
}

/// How calls are started.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Arrival {
    /// `concurrency` callers, each starting its next call when the last one answered.
    #[default]
    Closed,
    /// Calls start on a seeded Poisson schedule at `rate` per second, whether or not earlier ones
    /// answered; latency counts from the scheduled start, so queueing is not hidden (no coordinated
    /// omission).
    Open { rate: f64 },
    /// As `Open`, at a rate that ramps through `stages` (k6's stages): it moves linearly from the
    /// previous stage's target (0 before the first) to each stage's target over its duration. The
    /// stages are the whole measured run: no warm-up.
    Ramp { stages: Arc<[Stage]> },
}

/// One stage of a ramp: the arrival rate reaches `target` calls per second at its end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    pub duration: Duration,
    pub target: f64,
}

/// The arrival rate `at` into `stages` (0 past the last).
pub fn ramp_rate(stages: &[Stage], at: Duration) -> f64 {
    let mut from = 0.0;
    let mut start = Duration::ZERO;
    for stage in stages {
        let end = start + stage.duration;
        if at < end {
            let progress = (at - start).as_secs_f64() / stage.duration.as_secs_f64().max(1e-9);
            return from + (stage.target - from) * progress;
        }
        (from, start) = (stage.target, end);
    }
    0.0
}

/// Calls the stages offer in all (the integral of their rate).
pub fn ramp_calls(stages: &[Stage]) -> f64 {
    let mut from = 0.0;
    let mut calls = 0.0;
    for stage in stages {
        calls += (from + stage.target) / 2.0 * stage.duration.as_secs_f64();
        from = stage.target;
    }
    calls
}

/// Offsets of a seeded Poisson process whose rate follows `stages`: arrivals at the stages' peak
/// rate, each kept with probability rate(t)/peak (thinning; Lewis and Shedler).
pub fn ramp_arrivals(stages: &[Stage], seed: u64) -> impl Iterator<Item = Duration> + use<> {
    let stages: Vec<Stage> = stages.to_vec();
    let peak = stages.iter().map(|stage| stage.target).fold(0.0, f64::max);
    let end: Duration = stages.iter().map(|stage| stage.duration).sum();
    let mut keep = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_0f7a_3e00_u64);
    (peak > 0.0)
        .then(|| poisson_arrivals(peak, seed))
        .into_iter()
        .flatten()
        .take_while(move |at| *at < end)
        .filter(move |at| keep.random_range(0.0..peak) < ramp_rate(&stages, *at))
}

/// Offsets from the start of a Poisson process of `rate` events per second (exponential gaps).
pub fn poisson_arrivals(rate: f64, seed: u64) -> impl Iterator<Item = Duration> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut at = 0.0f64;
    std::iter::from_fn(move || {
        let uniform: f64 = rng.random_range(f64::EPSILON..1.0);
        at += -uniform.ln() / rate;
        Some(Duration::from_secs_f64(at))
    })
}

/// Where calls go.
#[derive(Debug, Clone)]
pub enum Target {
    Distributed(Arc<MoeClient>),
    Reference(Arc<dyn InProcessLayer>),
}

impl Target {
    /// Socket bytes so far per worker endpoint: `(endpoint, sent, received)`.
    fn wire_bytes(&self) -> Vec<(Arc<str>, u64, u64)> {
        match self {
            Target::Distributed(client) => client.wire_bytes(),
            Target::Reference(_) => Vec::new(),
        }
    }

    fn model(&self) -> Option<ModelSpec> {
        match self {
            Target::Distributed(client) => client.table().map(|table| table.model.clone()),
            Target::Reference(reference) => Some(reference.model().clone()),
        }
    }

    /// One call of `plan`: its layers in order, the stand-in before each, outcomes merged.
    async fn call(
        &self,
        plan: &CallPlan,
        hidden: Arc<Vec<f32>>,
        routing: RoutingOverrides,
    ) -> Result<CallOutcome, ClientError> {
        let mut merged: Option<CallOutcome> = None;
        let mut input = hidden;
        let mut stream: Option<ResidualStream> = None;
        for (position, &layer) in plan.layers.iter().enumerate() {
            let attention = plan.stand_in.run(&input).await;
            let (mut outcome, output) = self.call_layer(layer, input.clone(), routing).await?;
            outcome.attention = attention;
            if position + 1 < plan.layers.len() {
                // The client adds the layer's output to the residual stream before the next layer:
                // its time is the combine's.
                let started = Instant::now();
                let residual = stream.take().unwrap_or_else(|| ResidualStream::new(&input, plan.d_model));
                let (residual, next) = tokio::task::spawn_blocking(move || {
                    let mut residual = residual;
                    let next = residual.advance(&output);
                    (residual, next)
                })
                .await
                .map_err(|error| ClientError::Internal { reason: format!("the residual stream's task: {error}") })?;
                (stream, input) = (Some(residual), Arc::new(next));
                let added = started.elapsed();
                outcome.timing.combine += added;
                outcome.timing.wall += added;
            }
            match &mut merged {
                None => merged = Some(outcome),
                Some(step) => step.add_layer(outcome),
            }
        }
        let mut outcome =
            merged.ok_or(ClientError::InvalidInput { field: "layers", reason: "no layer to call".into() })?;
        outcome.routing.stats = outcome.routing.stats.mean_of(plan.layers.len() as u64);
        Ok(outcome)
    }

    async fn call_layer(
        &self,
        layer: u32,
        hidden: Arc<Vec<f32>>,
        routing: RoutingOverrides,
    ) -> Result<(CallOutcome, Vec<f32>), ClientError> {
        match self {
            // The distributed client carries its overrides in its options.
            Target::Distributed(client) => {
                let output = client.forward(layer, &hidden).await?;
                let outcome = CallOutcome {
                    routing: output.routing,
                    timing: output.timing,
                    bytes: output.bytes,
                    workers: vec![(layer, output.workers)],
                    attention: Duration::ZERO,
                };
                Ok((outcome, output.hidden))
            }
            // Its experts compute on its worker's thread, as the distributed layer's do on theirs.
            Target::Reference(reference) => {
                let output = reference.forward_rows(layer, &hidden, &routing).await?;
                let outcome = CallOutcome {
                    routing: output.routing,
                    timing: output.timing,
                    bytes: ByteCounts::default(),
                    workers: Vec::new(),
                    attention: Duration::ZERO,
                };
                Ok((outcome, output.hidden))
            }
        }
    }
}

/// The layers each call runs through, and what stands in for attention before each.
struct CallPlan {
    layers: Vec<u32>,
    stand_in: PreparedStandIn,
    d_model: usize,
}

impl CallPlan {
    fn of(spec: &LoadSpec, d_model: usize) -> Self {
        let (layers, stand_in) = match &spec.step {
            Some(step) => (step.layers.clone(), PreparedStandIn::new(step.attention, d_model)),
            None => (vec![spec.layer], PreparedStandIn::None),
        };
        Self { layers, stand_in, d_model }
    }
}

struct CallOutcome {
    routing: RoutingSummary,
    timing: TimeBreakdown,
    bytes: ByteCounts,
    /// Each layer's workers' shares of this call.
    workers: Vec<(u32, Vec<WorkerCall>)>,
    /// The attention stand-ins' time.
    attention: Duration,
}

impl CallOutcome {
    /// Folds the next layer of a step in: the same tokens, every other count and time added.
    fn add_layer(&mut self, layer: CallOutcome) {
        let routing = &mut self.routing;
        routing.assignments += layer.routing.assignments;
        routing.dropped += layer.routing.dropped;
        routing.rerouted += layer.routing.rerouted;
        routing.refused += layer.routing.refused;
        routing.stats += layer.routing.stats;
        if routing.tokens_per_expert.len() < layer.routing.tokens_per_expert.len() {
            routing.tokens_per_expert.resize(layer.routing.tokens_per_expert.len(), 0);
        }
        for (total, load) in routing.tokens_per_expert.iter_mut().zip(&layer.routing.tokens_per_expert) {
            *total += load;
        }
        self.timing += layer.timing;
        self.bytes += layer.bytes;
        self.workers.extend(layer.workers);
        self.attention += layer.attention;
    }
}

/// Everything a load test measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub target: String,
    pub concurrency: usize,
    pub arrival: Arrival,
    pub tokens_per_call: usize,
    pub measured: Duration,
    /// From the window's start until its last call ended: past `measured` when calls started in
    /// the window were still out at its end (an overloaded cluster).
    pub elapsed: Duration,
    pub calls: u64,
    /// Open loop: measured arrivals not started because `max_in_flight` calls were out.
    pub dropped_arrivals: u64,
    /// Failed calls by gRPC code name.
    pub errors: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    pub tokens: u64,
    pub assignments: u64,
    pub dropped: u64,
    pub rerouted: u64,
    /// Assignments full expert queues refused and the client let overflow (`--on-refusal overflow`).
    pub refused: u64,
    /// Router statistics summed over calls (see [`LoadReport::mean_router_stats`]).
    pub router_stats_total: RouterStats,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
    /// Per phase of [`TimeBreakdown::PHASES`], microseconds per call.
    pub phase_histograms: Vec<Histogram<u64>>,
    /// Kept assignments per expert, summed over calls.
    pub expert_load: Vec<u64>,
    pub timing_total: TimeBreakdown,
    pub bytes_total: ByteCounts,
    /// Per (layer, worker): bytes, encode/decode, dispatch, queue, compute, the straggler view.
    pub ledger: CommLedger,
    /// Per call, the slowest worker's request transfer (client → worker handler), summed over calls.
    pub dispatch_total: Duration,
    /// Per call, the slowest worker's answer transfer (worker reply → client), summed over calls.
    pub combine_transfer_total: Duration,
    /// The same two transfers call by call, in microseconds (calls that reached a worker): how
    /// they spread around the means the totals give.
    pub dispatch_histogram: Histogram<u64>,
    pub combine_transfer_histogram: Histogram<u64>,
    /// Per call, the longest of the workers' whole request transfers (first sent → last received)
    /// and answer transfers (first reply → last answer in), summed over calls: what a link's rate
    /// bounds.
    pub dispatch_span_total: Duration,
    pub combine_span_total: Duration,
    /// MoE layers each call ran through (1, or a whole-model step's), and the attention stand-ins'
    /// time summed over calls.
    pub layers_per_call: usize,
    pub attention_total: Duration,
}

impl LoadReport {
    /// A report of no calls yet, of `spec`'s load, labelled `name`.
    fn empty(name: &str, spec: &LoadSpec) -> Self {
        LoadReport {
            target: name.to_owned(),
            concurrency: spec.concurrency,
            arrival: spec.arrival.clone(),
            tokens_per_call: spec.tokens_per_call,
            measured: Duration::ZERO,
            elapsed: Duration::ZERO,
            calls: 0,
            dropped_arrivals: 0,
            errors: BTreeMap::new(),
            first_error: None,
            tokens: 0,
            assignments: 0,
            dropped: 0,
            rerouted: 0,
            refused: 0,
            router_stats_total: RouterStats::default(),
            latency: micros_histogram(),
            phase_histograms: TimeBreakdown::PHASES.iter().map(|_| micros_histogram()).collect(),
            expert_load: Vec::new(),
            timing_total: TimeBreakdown::default(),
            bytes_total: ByteCounts::default(),
            ledger: CommLedger::default(),
            dispatch_total: Duration::ZERO,
            combine_transfer_total: Duration::ZERO,
            dispatch_histogram: micros_histogram(),
            combine_transfer_histogram: micros_histogram(),
            dispatch_span_total: Duration::ZERO,
            combine_span_total: Duration::ZERO,
            layers_per_call: spec.step.as_ref().map_or(1, |step| step.layers.len()),
            attention_total: Duration::ZERO,
        }
    }

    /// Adds the calls of `later`, a run of the same load against the same target measured after
    /// this one: a measurement taken in rounds (with something else measured between them) reads
    /// as one.
    pub fn absorb(&mut self, later: LoadReport) {
        self.measured += later.measured;
        self.elapsed += later.elapsed;
        self.calls += later.calls;
        self.dropped_arrivals += later.dropped_arrivals;
        for (code, count) in later.errors {
            *self.errors.entry(code).or_default() += count;
        }
        if self.first_error.is_none() {
            self.first_error = later.first_error;
        }
        self.tokens += later.tokens;
        self.assignments += later.assignments;
        self.dropped += later.dropped;
        self.rerouted += later.rerouted;
        self.refused += later.refused;
        self.router_stats_total += later.router_stats_total;
        let _ = self.latency.add(&later.latency);
        for (histogram, more) in self.phase_histograms.iter_mut().zip(&later.phase_histograms) {
            let _ = histogram.add(more);
        }
        add_loads(&mut self.expert_load, &later.expert_load);
        self.timing_total += later.timing_total;
        self.bytes_total += later.bytes_total;
        self.ledger.absorb(later.ledger);
        self.dispatch_total += later.dispatch_total;
        self.combine_transfer_total += later.combine_transfer_total;
        let _ = self.dispatch_histogram.add(&later.dispatch_histogram);
        let _ = self.combine_transfer_histogram.add(&later.combine_transfer_histogram);
        self.dispatch_span_total += later.dispatch_span_total;
        self.combine_span_total += later.combine_span_total;
        self.attention_total += later.attention_total;
    }

    /// Over the real time the window's calls took ([`LoadReport::elapsed`]), so an overloaded
    /// run does not claim the answers that came after its window.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.elapsed.max(self.measured).as_secs_f64().max(1e-9)
    }

    /// Successful calls per second, over the real time the window's calls took.
    pub fn calls_per_second(&self) -> f64 {
        self.calls as f64 / self.elapsed.max(self.measured).as_secs_f64().max(1e-9)
    }

    pub fn latency_at(&self, quantile: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(quantile))
    }

    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Mean time breakdown of a successful call.
    pub fn mean_timing(&self) -> TimeBreakdown {
        self.timing_total.mean_of(self.calls)
    }

    /// Router statistics averaged over successful calls.
    pub fn mean_router_stats(&self) -> RouterStats {
        self.router_stats_total.mean_of(self.calls)
    }
}

/// Microseconds from 1 µs to 10 minutes, 3 significant digits.
fn micros_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn micros(duration: Duration) -> u64 {
    duration.as_micros().clamp(1, 600_000_000) as u64
}

struct Shared {
    report: Mutex<LoadReport>,
    claimed: AtomicU64,
}

impl Shared {
    /// Counts one measured call that took `latency`.
    fn record(&self, outcome: Result<CallOutcome, ClientError>, latency: Duration) {
        let mut report = self.report.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match outcome {
            Ok(outcome) => {
                report.calls += 1;
                report.tokens += outcome.routing.tokens as u64;
                report.assignments += outcome.routing.assignments as u64;
                report.dropped += outcome.routing.dropped as u64;
                report.rerouted += outcome.routing.rerouted as u64;
                report.refused += outcome.routing.refused as u64;
                report.router_stats_total += outcome.routing.stats;
                report.timing_total += outcome.timing;
                report.bytes_total += outcome.bytes;
                let _ = report.latency.record(micros(latency));
                for (histogram, phase) in report.phase_histograms.iter_mut().zip(outcome.timing.phases()) {
                    let _ = histogram.record(micros(phase));
                }
                add_loads(&mut report.expert_load, &outcome.routing.tokens_per_expert);
                report.attention_total += outcome.attention;
                // A step's layers run one after the other: its transfers add up, each the slowest
                // worker's of its layer.
                let (mut dispatch, mut combine_transfer) = (Duration::ZERO, Duration::ZERO);
                for (layer, workers) in &outcome.workers {
                    report.ledger.record(*layer, workers);
                    let slowest =
                        |time: fn(&WorkerCall) -> Duration| workers.iter().map(time).max().unwrap_or_default();
                    dispatch += slowest(|call| call.dispatch);
                    combine_transfer += slowest(|call| call.combine_transfer);
                    report.dispatch_span_total += slowest(WorkerCall::dispatch_span);
                    report.combine_span_total += slowest(WorkerCall::combine_span);
                }
                report.dispatch_total += dispatch;
                report.combine_transfer_total += combine_transfer;
                if outcome.workers.iter().any(|(_, workers)| !workers.is_empty()) {
                    let _ = report.dispatch_histogram.record(micros(dispatch));
                    let _ = report.combine_transfer_histogram.record(micros(combine_transfer));
                }
            }
            Err(error) => {
                *report.errors.entry(format!("{:?}", error.code())).or_default() += 1;
                report.first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }

    /// True while the request budget (if any) allows one more measured call.
    fn claim(&self, requests: Option<u64>) -> bool {
        requests.is_none_or(|limit| self.claimed.fetch_add(1, Ordering::Relaxed) < limit)
    }
}

/// Runs `spec` against `target`; `name` labels the report.
pub async fn run(target: Target, spec: LoadSpec, name: &str) -> Result<LoadReport, ClientError> {
    let model =
        target.model().ok_or(ClientError::NoTable { coordinator: "(load test)".into(), waited: Duration::ZERO })?;
    let gate = gate_rows(&model, spec.layer)?;
    let (experts, d_model) = (model.experts_per_layer as usize, model.d_model as usize);
    let inputs_for = |seed: u64| Inputs::generate(&spec.skew, &gate, experts, spec.tokens_per_call, d_model, seed);
    let plan = Arc::new(CallPlan::of(&spec, d_model));
    let report = LoadReport::empty(name, &spec);
    let shared = Arc::new(Shared { report: Mutex::new(report), claimed: AtomicU64::new(0) });
    let started = Instant::now();
    // A ramp's stages are its whole run, measured from the start.
    let (warmup, duration) = match &spec.arrival {
        Arrival::Ramp { stages } => (Duration::ZERO, stages.iter().map(|stage| stage.duration).sum()),
        Arrival::Closed | Arrival::Open { .. } => (spec.warmup, spec.duration),
    };
    let measure_from = started + warmup;
    let deadline = measure_from + duration;
    let progress = spec.progress.then(|| {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        (stop, tokio::spawn(show_progress(shared.clone(), measure_from, deadline, stopped)))
    });
    // Without a warm-up the counters are read before the first call, not by a task that may run late.
    let wire_now = spec.warmup.is_zero().then(|| target.wire_bytes());
    let wire_at_start = {
        let target = target.clone();
        tokio::spawn(async move {
            match wire_now {
                Some(bytes) => bytes,
                None => {
                    tokio::time::sleep_until(measure_from.into()).await;
                    target.wire_bytes()
                }
            }
        })
    };
    let window = Window { target: &target, layer: spec.layer, measure_from, deadline, wire_at_start };
    let schedule: Option<Box<dyn Iterator<Item = Duration> + Send>> = match &spec.arrival {
        Arrival::Closed => None,
        Arrival::Open { rate } => Some(Box::new(poisson_arrivals(*rate, spec.seed))),
        Arrival::Ramp { stages } => Some(Box::new(ramp_arrivals(stages, spec.seed))),
    };
    if let Some(schedule) = schedule {
        let inputs = inputs_for(spec.seed);
        run_open_loop(&target, &spec, &plan, &shared, inputs, schedule, started, measure_from, deadline).await;
        return Ok(finish(&shared, window, progress).await);
    }
    let callers = (0..spec.concurrency.max(1)).map(|caller| {
        let (target, spec, shared, plan) = (target.clone(), spec.clone(), shared.clone(), plan.clone());
        let inputs = inputs_for(spec.seed.wrapping_add(caller as u64));
        tokio::spawn(async move {
            let mut call_index = 0usize;
            loop {
                let call_started = Instant::now();
                if call_started >= deadline {
                    return;
                }
                let measured = call_started >= measure_from;
                if measured && !shared.claim(spec.requests) {
                    return;
                }
                let hidden = inputs.pick(call_index, call_started.duration_since(started));
                call_index += 1;
                let outcome = target.call(&plan, hidden, spec.routing).await;
                if !measured {
                    continue;
                }
                shared.record(outcome, call_started.elapsed());
            }
        })
    });
    futures::future::join_all(callers).await;
    Ok(finish(&shared, window, progress).await)
}

/// The measured window of a run, and the socket byte counts when it opened.
struct Window<'a> {
    target: &'a Target,
    layer: u32,
    measure_from: Instant,
    deadline: Instant,
    wire_at_start: tokio::task::JoinHandle<Vec<(Arc<str>, u64, u64)>>,
}

async fn finish(
    shared: &Shared,
    window: Window<'_>,
    progress: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
) -> LoadReport {
    if let Some((stop, _cleared_on_stop)) = progress {
        let _ = stop.send(());
    }
    let wire_at_end = window.target.wire_bytes();
    // A run that ends before its warm-up does counts its sockets from the start.
    let wire_at_start = if window.wire_at_start.is_finished() {
        window.wire_at_start.await.unwrap_or_default()
    } else {
        window.wire_at_start.abort();
        Vec::new()
    };
    let mut report = shared.report.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    let now = Instant::now();
    report.measured = now.min(window.deadline).saturating_duration_since(window.measure_from);
    report.elapsed = now.saturating_duration_since(window.measure_from);
    for (endpoint, sent, received) in wire_at_end {
        let (sent_before, received_before) = wire_at_start
            .iter()
            .find(|(before, _, _)| *before == endpoint)
            .map_or((0, 0), |(_, sent, received)| (*sent, *received));
        report.ledger.set_socket_bytes(window.layer, &endpoint, sent - sent_before, received - received_before);
    }
    report
}

/// Redraws one status line four times a second: phase, calls, current throughput and p99.
async fn show_progress(
    shared: Arc<Shared>,
    measure_from: Instant,
    deadline: Instant,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let bar = indicatif::ProgressBar::new(deadline.saturating_duration_since(measure_from).as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut stop => {
                bar.finish_and_clear();
                return;
            }
        }
        let now = Instant::now();
        let (tokens, calls, failed, p99) = {
            let report = shared.report.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            (report.tokens, report.calls, report.failed(), report.latency_at(0.99))
        };
        let rate = (tokens - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
        last = (now, tokens);
        if now < measure_from {
            bar.set_message("warming up");
            continue;
        }
        bar.set_position(now.saturating_duration_since(measure_from).as_millis() as u64);
        bar.set_message(format!(
            "{calls} calls, {failed} failed, {rate:.0} tokens/s now, p99 {:.1} ms",
            p99.as_secs_f64() * 1e3
        ));
    }
}

/// Starts calls at `schedule`'s offsets from `started` until `deadline`, each measured from its
/// scheduled start.
#[allow(clippy::too_many_arguments)]
async fn run_open_loop(
    target: &Target,
    spec: &LoadSpec,
    plan: &Arc<CallPlan>,
    shared: &Arc<Shared>,
    inputs: Inputs,
    schedule: impl Iterator<Item = Duration>,
    started: Instant,
    measure_from: Instant,
    deadline: Instant,
) {
    let mut calls = tokio::task::JoinSet::new();
    // The offered window lasts until the deadline even when its last arrival comes earlier (a
    // ramp down to 0), unless the request budget ends the test first.
    let mut window_ends = Some(deadline);
    for (index, offset) in schedule.enumerate() {
        let scheduled = started + offset;
        if scheduled >= deadline {
            break;
        }
        let measured = scheduled >= measure_from;
        if measured && !shared.claim(spec.requests) {
            window_ends = None;
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        while calls.try_join_next().is_some() {}
        if calls.len() >= spec.max_in_flight.max(1) {
            if measured {
                shared.report.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).dropped_arrivals += 1;
            }
            continue;
        }
        let (target, shared, hidden) = (target.clone(), shared.clone(), inputs.pick(index, offset));
        let (plan, routing) = (plan.clone(), spec.routing);
        calls.spawn(async move {
            let outcome = target.call(&plan, hidden, routing).await;
            if measured {
                shared.record(outcome, scheduled.elapsed());
            }
        });
    }
    if let Some(deadline) = window_ends {
        tokio::time::sleep_until(deadline.into()).await;
    }
    while calls.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use switchyard_reference::{ReferenceConfig, ReferenceLayer};

    use super::*;

    async fn reference(model: &ModelSpec) -> Arc<ReferenceLayer> {
        Arc::new(ReferenceLayer::start(model, &[0], ReferenceConfig::cpu()).await.expect("reference"))
    }

    #[test]
    fn a_ramp_offers_its_stages_rates_in_turn() {
        let stages = [
            Stage { duration: Duration::from_secs(10), target: 1_000.0 },
            Stage { duration: Duration::from_secs(10), target: 1_000.0 },
            Stage { duration: Duration::from_secs(5), target: 0.0 },
        ];
        assert_eq!(ramp_rate(&stages, Duration::from_secs(5)), 500.0);
        assert_eq!(ramp_rate(&stages, Duration::from_secs(15)), 1_000.0);
        assert_eq!(ramp_rate(&stages, Duration::from_millis(23_500)), 300.0);
        assert_eq!(ramp_rate(&stages, Duration::from_secs(30)), 0.0);
        assert_eq!(ramp_calls(&stages), 5_000.0 + 10_000.0 + 2_500.0);
        let offsets: Vec<Duration> = ramp_arrivals(&stages, 9).collect();
        let within = |from: u64, to: u64| {
            offsets.iter().filter(|at| (Duration::from_secs(from)..Duration::from_secs(to)).contains(*at)).count()
                as f64
        };
        // Poisson counts: within five standard deviations of each stage's expected calls.
        for (count, expected) in [(within(0, 10), 5_000.0), (within(10, 20), 10_000.0), (within(20, 25), 2_500.0)] {
            assert!((count - expected).abs() < 5.0 * f64::sqrt(expected), "{count} arrivals for {expected}");
        }
        // Rising: the first ramp's second half gets about three times its first half's calls.
        let (first, second) = (within(0, 5), within(5, 10));
        assert!((2.6..3.4).contains(&(second / first)), "{first} then {second}");
        assert!(offsets.windows(2).all(|pair| pair[0] <= pair[1]) && offsets.last() < Some(&Duration::from_secs(25)));
        assert_eq!(offsets[..10], ramp_arrivals(&stages, 9).take(10).collect::<Vec<_>>()[..], "seeded");
    }

    #[tokio::test]
    async fn a_ramp_is_the_whole_run_and_every_arrival_is_counted() {
        let model = ModelSpec { d_model: 8, d_ff: 16, experts_per_layer: 4, ..ModelSpec::default_synthetic() };
        let stages: Arc<[Stage]> = vec![
            Stage { duration: Duration::from_millis(500), target: 200.0 },
            Stage { duration: Duration::from_millis(500), target: 0.0 },
        ]
        .into();
        let spec = LoadSpec {
            concurrency: 1,
            arrival: Arrival::Ramp { stages: stages.clone() },
            // A ramp's stages replace both.
            duration: Duration::from_secs(60),
            warmup: Duration::from_secs(60),
            requests: None,
            tokens_per_call: 4,
            layer: 0,
            step: None,
            seed: 2,
            routing: RoutingOverrides::default(),
            progress: false,
            skew: Skew::Uniform,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        };
        let report = run(Target::Reference(reference(&model).await), spec, "reference").await.expect("load test");
        let scheduled = ramp_arrivals(&stages, 2).count() as u64;
        assert!((50..=150).contains(&scheduled), "{scheduled} arrivals for 100 expected");
        assert_eq!(report.calls + report.failed() + report.dropped_arrivals, scheduled, "every arrival counted once");
        assert_eq!(report.measured, Duration::from_secs(1), "the stages' whole span, not 60 s");
        let summary = report.summary();
        assert_eq!(summary.arrival, "ramp 500ms:200,500ms:0");
        assert_eq!(summary.rate_calls_per_s, Some(100.0), "the mean offered rate");
    }

    /// One layer call: (layer, input, output).
    type RecordedCall = (u32, Vec<f32>, Vec<f32>);

    /// A reference layer that keeps every call.
    #[derive(Debug)]
    struct Recording {
        inner: Arc<ReferenceLayer>,
        calls: std::sync::Mutex<Vec<RecordedCall>>,
    }

    impl InProcessLayer for Recording {
        fn model(&self) -> &ModelSpec {
            self.inner.model()
        }

        fn forward_rows<'a>(
            &'a self,
            layer: u32,
            hidden: &'a Arc<Vec<f32>>,
            routing: &'a RoutingOverrides,
        ) -> futures::future::BoxFuture<'a, Result<switchyard_router_client::InProcessOutput, ClientError>> {
            Box::pin(async move {
                let output = self.inner.forward_rows(layer, hidden, routing).await?;
                self.calls.lock().expect("calls").push((layer, hidden.to_vec(), output.hidden.clone()));
                Ok(output)
            })
        }
    }

    #[tokio::test]
    async fn a_whole_model_step_runs_every_layer_in_order_with_the_stand_in_before_each() {
        let model = ModelSpec {
            d_model: 8,
            d_ff: 16,
            experts_per_layer: 4,
            moe_layers: vec![0, 1, 2],
            ..ModelSpec::default_synthetic()
        };
        let layers =
            Arc::new(ReferenceLayer::start(&model, &[0, 1, 2], ReferenceConfig::cpu()).await.expect("reference"));
        let wait = Duration::from_millis(2);
        let spec = LoadSpec {
            concurrency: 1,
            arrival: Arrival::Closed,
            duration: Duration::from_secs(30),
            warmup: Duration::ZERO,
            requests: Some(5),
            tokens_per_call: 4,
            layer: 0,
            step: Some(ModelStep { layers: vec![0, 1, 2], attention: AttentionStandIn::Wait(wait) }),
            seed: 3,
            routing: RoutingOverrides::default(),
            progress: false,
            skew: Skew::Uniform,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        };
        let report = run(Target::Reference(layers.clone()), spec.clone(), "steps").await.expect("load test");
        assert_eq!((report.calls, report.layers_per_call), (5, 3));
        assert_eq!(report.tokens, 5 * 4, "a step's tokens are counted once");
        assert_eq!(report.assignments, 5 * 4 * u64::from(model.top_k) * 3, "every layer routed them");
        assert!(report.attention_total >= wait * 3 * 5, "{:?}", report.attention_total);
        let step = report.summary().step.expect("a step split");
        assert_eq!(step.layers, 3);
        assert!(step.attention_ms >= 6.0 && step.client_compute_ms >= step.attention_ms, "{step:?}");
        let parts = step.communication_ms + step.expert_compute_ms + step.client_compute_ms;
        assert!(parts <= step.step_ms * 1.001, "the parts fit in the step: {step:?}");
        assert!(report.latency.mean() / 1e3 >= step.attention_ms, "a step's latency covers its stand-ins");

        // Each layer's input is the residual stream of the ones before it, not the step's input.
        let recording = Arc::new(Recording { inner: layers.clone(), calls: std::sync::Mutex::default() });
        let one_step = LoadSpec { requests: Some(1), ..spec.clone() };
        run(Target::Reference(recording.clone()), one_step, "one step").await.expect("load test");
        let calls = recording.calls.lock().expect("calls").clone();
        assert_eq!(calls.iter().map(|(layer, _, _)| *layer).collect::<Vec<_>>(), [0, 1, 2]);
        let mut stream = ResidualStream::new(&calls[0].1, model.d_model as usize);
        for (before, after) in calls.iter().zip(&calls[1..]) {
            assert_ne!(after.1, before.1, "layer {} got a new input", after.0);
            assert_eq!(after.1, stream.advance(&before.2), "layer {}'s input: the stream after {}", after.0, before.0);
        }

        let one_layer = LoadSpec { step: None, ..spec };
        let report = run(Target::Reference(layers), one_layer, "one layer").await.expect("load test");
        assert_eq!((report.layers_per_call, report.summary().step), (1, None));
        assert_eq!(report.assignments, 5 * 4 * u64::from(model.top_k));
    }

    #[test]
    fn poisson_arrivals_have_the_asked_rate_and_exponential_gaps() {
        let offsets: Vec<Duration> =
            poisson_arrivals(500.0, 3).take_while(|at| *at < Duration::from_secs(20)).collect();
        // 10,000 expected; Poisson standard deviation 100.
        assert!((9_600..=10_400).contains(&offsets.len()), "{} arrivals in 20 s at 500/s", offsets.len());
        let gaps: Vec<f64> = offsets.windows(2).map(|pair| (pair[1] - pair[0]).as_secs_f64()).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let variance = gaps.iter().map(|gap| (gap - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        assert!((mean - 0.002).abs() < 0.0001, "mean gap {mean}");
        // An exponential distribution's standard deviation equals its mean.
        assert!((variance.sqrt() / mean - 1.0).abs() < 0.05, "coefficient of variation {}", variance.sqrt() / mean);
        assert_eq!(offsets[..5], poisson_arrivals(500.0, 3).take(5).collect::<Vec<_>>()[..], "seeded");
    }

    /// Records `n` values at the quantiles `(i + 0.5) / n` of a distribution (its inverse CDF), so
    /// every percentile of the recorded set is known exactly.
    fn histogram_of(n: usize, inverse_cdf: impl Fn(f64) -> f64) -> Histogram<u64> {
        let mut histogram = micros_histogram();
        for i in 0..n {
            histogram.record(inverse_cdf((i as f64 + 0.5) / n as f64).round() as u64).expect("in range");
        }
        histogram
    }

    fn assert_quantile(histogram: &Histogram<u64>, quantile: f64, expected: f64, name: &str) {
        let measured = histogram.value_at_quantile(quantile) as f64;
        // Three significant digits: HDR buckets are at most 0.1% wide (plus rounding to whole µs).
        let error = (measured - expected).abs() / expected;
        assert!(error < 0.002, "{name} p{}: {measured} µs for {expected:.1} µs expected", quantile * 100.0);
    }

    #[test]
    fn percentiles_match_known_distributions() {
        let n = 200_000;
        // Uniform on [1 ms, 101 ms]: the q-quantile is 1 ms + q x 100 ms.
        let uniform = histogram_of(n, |q| 1_000.0 + q * 100_000.0);
        for quantile in [0.5, 0.9, 0.99, 0.999] {
            assert_quantile(&uniform, quantile, 1_000.0 + quantile * 100_000.0, "uniform");
        }
        // Exponential with a 2 ms mean: the q-quantile is -2 ms x ln(1 - q); the mean is 2 ms.
        let exponential = histogram_of(n, |q| -2_000.0 * (1.0 - q).ln());
        for quantile in [0.5, 0.9, 0.99, 0.999] {
            assert_quantile(&exponential, quantile, -2_000.0 * (1.0f64 - quantile).ln(), "exponential");
        }
        assert!((exponential.mean() / 2_000.0 - 1.0).abs() < 0.01, "mean {}", exponential.mean());
        // A bimodal tail: 95% of calls at 1 ms, 5% at 250 ms. p50 and p90 do not see the tail; p99 does.
        let bimodal = histogram_of(n, |q| if q < 0.95 { 1_000.0 } else { 250_000.0 });
        assert_quantile(&bimodal, 0.5, 1_000.0, "bimodal");
        assert_quantile(&bimodal, 0.9, 1_000.0, "bimodal");
        assert_quantile(&bimodal, 0.99, 250_000.0, "bimodal");
        // Durations are clamped into the histogram's range rather than dropped.
        assert_eq!(micros(Duration::ZERO), 1);
        assert_eq!(micros(Duration::from_secs(3600)), 600_000_000);
    }

    /// A call's transfers are its slowest worker's of each layer, added over a step's layers, and
    /// each call that reached a worker is one value of the transfer histograms.
    #[test]
    fn each_call_records_its_slowest_workers_transfers_summed_over_its_layers() {
        let spec = LoadSpec::closed_loop(1, Duration::from_secs(1), 8, 3, 1);
        let shared = Shared { report: Mutex::new(LoadReport::empty("transfers", &spec)), claimed: AtomicU64::new(0) };
        let worker = |endpoint: &str, dispatch_us: u64, combine_us: u64| {
            let mut call = WorkerCall::new(endpoint.into());
            call.dispatch = Duration::from_micros(dispatch_us);
            call.combine_transfer = Duration::from_micros(combine_us);
            call
        };
        let call = |workers: Vec<(u32, Vec<WorkerCall>)>| CallOutcome {
            routing: RoutingSummary::default(),
            timing: TimeBreakdown::default(),
            bytes: ByteCounts::default(),
            workers,
            attention: Duration::ZERO,
        };
        // A step of two layers: 300 + 200 µs of dispatch, 40 + 90 µs of combine.
        let step = vec![(0, vec![worker("a", 100, 40), worker("b", 300, 10)]), (1, vec![worker("a", 200, 90)])];
        shared.record(Ok(call(step)), Duration::from_millis(2));
        shared.record(Ok(call(vec![(0, vec![worker("a", 900, 700)])])), Duration::from_millis(2));
        // In-process: no worker, no transfer.
        shared.record(Ok(call(Vec::new())), Duration::from_millis(1));
        let mut report = shared.report.into_inner().expect("not poisoned");
        assert_eq!(report.calls, 3);
        assert_eq!(report.dispatch_total, Duration::from_micros(500 + 900));
        assert_eq!(report.combine_transfer_total, Duration::from_micros(130 + 700));
        for (histogram, (least, most)) in
            [(&report.dispatch_histogram, (500, 900)), (&report.combine_transfer_histogram, (130, 700))]
        {
            assert_eq!(histogram.len(), 2, "the calls that reached a worker");
            assert!(histogram.equivalent(histogram.min(), least) && histogram.equivalent(histogram.max(), most));
        }
        // A later round's calls join them.
        let later = Shared { report: Mutex::new(LoadReport::empty("transfers", &spec)), claimed: AtomicU64::new(0) };
        later.record(Ok(call(vec![(0, vec![worker("b", 50, 20)])])), Duration::from_millis(1));
        report.absorb(later.report.into_inner().expect("not poisoned"));
        assert_eq!((report.dispatch_histogram.len(), report.combine_transfer_histogram.len()), (3, 3));
        assert!(report.dispatch_histogram.equivalent(report.dispatch_histogram.min(), 50));
    }

    /// A measurement in rounds reads as one: counts, histograms, phases and loads add up.
    #[tokio::test]
    async fn a_report_absorbs_a_later_rounds_calls() {
        let model = ModelSpec { d_model: 8, d_ff: 16, experts_per_layer: 4, ..ModelSpec::default_synthetic() };
        let target = Target::Reference(reference(&model).await);
        let spec = |requests: u64, seed: u64| LoadSpec::closed_loop(1, Duration::from_secs(10), 8, requests, seed);
        let mut first = run(target.clone(), spec(3, 1), "rounds").await.expect("load test");
        let second = run(target, spec(5, 2), "rounds").await.expect("load test");
        let (first_wall, second_wall) = (first.timing_total.wall, second.timing_total.wall);
        let (first_load, second_load) = (first.expert_load.clone(), second.expert_load.clone());
        let measured = first.measured + second.measured;
        first.absorb(second);
        assert_eq!((first.calls, first.tokens, first.latency.len()), (8, 64, 8));
        assert!(first.phase_histograms.iter().all(|histogram| histogram.len() == 8));
        assert_eq!(first.timing_total.wall, first_wall + second_wall);
        assert_eq!(first.measured, measured);
        let loads: Vec<u64> = first_load.iter().zip(&second_load).map(|(a, b)| a + b).collect();
        assert_eq!(first.expert_load, loads);
        assert_eq!(first.expert_load.iter().sum::<u64>(), first.assignments - first.dropped);
    }

    #[tokio::test]
    async fn json_and_csv_carry_every_figure() {
        let model = ModelSpec { d_model: 8, d_ff: 16, experts_per_layer: 4, ..ModelSpec::default_synthetic() };
        let reference = reference(&model).await;
        let spec = LoadSpec {
            concurrency: 2,
            arrival: Arrival::Closed,
            duration: Duration::from_secs(10),
            requests: Some(20),
            tokens_per_call: 8,
            layer: 0,
            step: None,
            warmup: Duration::ZERO,
            seed: 1,
            routing: RoutingOverrides::default(),
            progress: true,
            skew: Skew::Zipf { exponent: 1.2 },
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        };
        let report = run(Target::Reference(reference), spec, "reference \"tiny\"").await.expect("load test");
        assert_eq!(report.calls, 20, "the request budget ends the test");
        let summary = report.summary();
        let json = serde_json::to_value(&summary).expect("a summary is JSON");
        assert_eq!(json["calls"], 20);
        assert_eq!(json["expert_load"].as_array().map(Vec::len), Some(4));
        assert_eq!(
            json["expert_load"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum::<u64>(),
            20 * 8 * 2 - report.dropped
        );
        assert!(json["compute_p99_ms"].as_f64().unwrap() > 0.0);
        let back: LoadSummary = serde_json::from_value(json).expect("and reads back");
        assert_eq!(back, summary);
        let csv = crate::report::csv::load_reports(&[summary.clone(), summary]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        let columns = lines[0].split(',').count();
        assert!(lines[0].starts_with("target,arrival,concurrency,rate_calls_per_s,"));
        assert!(lines[1].starts_with("\"reference \"\"tiny\"\"\",\"closed\",2,,8,"), "{}", lines[1]);
        assert_eq!(lines[1].split(',').count(), columns, "every row has every column");
    }

    #[tokio::test]
    async fn the_open_loop_sends_at_the_asked_rate() {
        let model = ModelSpec { d_model: 8, d_ff: 16, experts_per_layer: 4, ..ModelSpec::default_synthetic() };
        let reference = reference(&model).await;
        let spec = LoadSpec {
            concurrency: 1,
            arrival: Arrival::Open { rate: 200.0 },
            duration: Duration::from_secs(2),
            requests: None,
            tokens_per_call: 4,
            layer: 0,
            step: None,
            warmup: Duration::ZERO,
            seed: 5,
            routing: RoutingOverrides::default(),
            progress: false,
            skew: Skew::Uniform,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        };
        let report = run(Target::Reference(reference.clone()), spec.clone(), "reference").await.expect("load test");
        // The schedule itself holds exactly this many arrivals in the window.
        let scheduled = poisson_arrivals(200.0, 5).take_while(|at| *at < Duration::from_secs(2)).count() as u64;
        assert_eq!(report.calls + report.failed(), scheduled, "every scheduled call was sent and counted");
        assert!((320..=480).contains(&scheduled), "{scheduled} arrivals for 400 expected");
        assert!(report.latency.max() < 1_000_000, "tiny calls answer well within a second");
        assert_eq!(report.dropped_arrivals, 0);

        // One call in flight at most, arrivals far faster than calls answer: the rest are
        // dropped and counted, never queued.
        let capped = LoadSpec { arrival: Arrival::Open { rate: 20_000.0 }, max_in_flight: 1, ..spec };
        let report = run(Target::Reference(reference), capped, "reference").await.expect("load test");
        let scheduled = poisson_arrivals(20_000.0, 5).take_while(|at| *at < Duration::from_secs(2)).count() as u64;
        assert!(report.dropped_arrivals > 0, "{} calls, none dropped", report.calls);
        assert_eq!(report.calls + report.failed() + report.dropped_arrivals, scheduled, "every arrival counted once");
    }
}
