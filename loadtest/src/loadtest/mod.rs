//! The load-test engine behind `switchyard loadtest` and `switchyard local --loadtest`: N concurrent
//! callers in a closed loop (or an open loop on a Poisson schedule) against the distributed layer or
//! the in-process reference, a warm-up that is not measured, and the tallies of a [`LoadReport`]:
//! latency (HDR histograms), errors by gRPC code, overflow, bytes, the time breakdown and the
//! ledger. `arrival` says when calls start, `target` what one call is, `report` tallies them;
//! `summary` turns them into figures; [`crate::report`] renders those.

mod arrival;
mod progress;
mod report;
mod step;
mod summary;
mod target;

pub use arrival::{Arrival, Stage, poisson_arrivals, ramp_arrivals, ramp_calls, ramp_rate};
pub use report::LoadReport;
pub use step::{AttentionStandIn, ModelStep, StepSplit};
pub use summary::{LoadSummary, PhaseFigures, RunInfo, Thresholds, describe_stages};
pub use switchyard_router_client::layer::InProcessLayer;
pub use target::Target;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_router_client::error::ClientError;
use switchyard_router_client::router::RoutingOverrides;

use self::progress::show_progress;
use self::target::{CallOutcome, CallPlan};
use crate::skew::{Inputs, Skew, gate_rows};

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

struct Shared {
    report: Mutex<LoadReport>,
    claimed: AtomicU64,
}

impl Shared {
    /// Counts one measured call that took `latency`.
    fn record(&self, outcome: Result<CallOutcome, ClientError>, latency: Duration) {
        self.report.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).record(outcome, latency);
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
    use hdrhistogram::Histogram;
    use switchyard_model::ModelSpec;
    use switchyard_reference::{ReferenceConfig, ReferenceLayer};
    use switchyard_router_client::ledger::{RpcTiming, WorkerCall};
    use switchyard_router_client::router::RoutingSummary;
    use switchyard_router_client::stats::RouterStats;

    use super::report::{micros, micros_histogram};
    use super::step::ResidualStream;
    use super::*;

    /// A synthetic model small enough for a load test of a fraction of a second.
    fn tiny_model() -> ModelSpec {
        ModelSpec { d_model: 8, d_ff: 16, experts_per_layer: 4, ..ModelSpec::default_synthetic() }
    }

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
        // A ramp that ends at its peak offers nothing from its last instant on: the run is over.
        let rising = [Stage { duration: Duration::from_secs(10), target: 100.0 }];
        assert!((ramp_rate(&rising, Duration::from_millis(9_990)) - 99.9).abs() < 1e-9);
        assert_eq!(ramp_rate(&rising, Duration::from_secs(10)), 0.0);
        let idle = [Stage { duration: Duration::from_secs(10), target: 0.0 }];
        assert_eq!(ramp_arrivals(&idle, 9).count(), 0, "stages that offer no calls start none");
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
        let model = tiny_model();
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

    async fn recording_reference() -> Arc<Recording> {
        Arc::new(Recording { inner: reference(&tiny_model()).await, calls: std::sync::Mutex::default() })
    }

    #[tokio::test]
    async fn warm_up_calls_are_made_but_not_counted() {
        let recording = recording_reference().await;
        let spec = LoadSpec {
            warmup: Duration::from_millis(200),
            ..LoadSpec::closed_loop(1, Duration::from_secs(30), 4, 5, 1)
        };
        let report = run(Target::Reference(recording.clone()), spec, "warmed up").await.expect("load test");
        let made = recording.calls.lock().expect("calls").len() as u64;
        assert_eq!(report.calls, 5, "the request budget counts measured calls");
        assert!(made > report.calls, "{made} calls made, {} counted", report.calls);
    }

    #[tokio::test]
    async fn a_closed_loop_caller_takes_its_batches_in_turn() {
        let recording = recording_reference().await;
        let spec = LoadSpec::closed_loop(1, Duration::from_secs(30), 4, 4, 1);
        run(Target::Reference(recording.clone()), spec, "in turn").await.expect("load test");
        let inputs: Vec<Vec<f32>> =
            recording.calls.lock().expect("calls").iter().map(|(_, input, _)| input.clone()).collect();
        assert_eq!(inputs.len(), 4);
        for (index, input) in inputs.iter().enumerate() {
            assert!(inputs[..index].iter().all(|earlier| earlier != input), "call {index} repeats a batch");
        }
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
        let call = |workers: Vec<(u32, Vec<WorkerCall>)>| CallOutcome { workers, ..CallOutcome::default() };
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

    /// Every count of a call goes into its report, and a later round's into the first: calls,
    /// failures by code (the first one kept), routing counts and statistics, dropped arrivals,
    /// both clocks, the workers' whole transfers; the rates divide by the longer clock.
    #[test]
    fn rounds_add_up_every_count_and_the_rates_use_the_longer_clock() {
        let spec = LoadSpec::closed_loop(1, Duration::from_secs(1), 8, 3, 1);
        // One worker whose request was on the wire from 1 000 to 1 300 µs and its answer from 1 500
        // to 1 600 µs (unix microseconds).
        let answered = || {
            let mut call = WorkerCall::new("a".into());
            let at = |us: u64| us * 1_000;
            let response = switchyard_proto::v1::ForwardResponse {
                received_unix_nanos: at(1_300),
                replied_unix_nanos: at(1_500),
                ..Default::default()
            };
            let rpc = RpcTiming { elapsed: Duration::ZERO, sent_unix_nanos: at(1_000), answered_unix_nanos: at(1_600) };
            call.record_answer(&response, &rpc);
            call
        };
        let routed = |dropped: usize, rerouted: usize, refused: usize, imbalance: f32| CallOutcome {
            routing: RoutingSummary {
                tokens: 8,
                assignments: 16,
                dropped,
                rerouted,
                refused,
                tokens_per_expert: vec![5, 3],
                stats: RouterStats { imbalance, ..RouterStats::default() },
                ..RoutingSummary::default()
            },
            workers: vec![(0, vec![answered()])],
            attention: Duration::from_micros(30),
            ..CallOutcome::default()
        };
        let timeout =
            |endpoint: &str| ClientError::Timeout { endpoint: endpoint.into(), after: Duration::from_secs(1) };
        let mut first = LoadReport::empty("rounds", &spec);
        first.record(Ok(routed(1, 2, 3, 1.5)), Duration::from_millis(2));
        first.record(Err(timeout("a")), Duration::from_millis(9));
        (first.measured, first.elapsed, first.dropped_arrivals) = (Duration::from_secs(2), Duration::from_secs(3), 4);
        let mut second = LoadReport::empty("rounds", &spec);
        second.record(Ok(routed(10, 20, 30, 2.5)), Duration::from_millis(4));
        second.record(Err(timeout("b")), Duration::from_millis(9));
        second.record(Err(ClientError::Internal { reason: "a bug".into() }), Duration::from_millis(9));
        (second.measured, second.elapsed, second.dropped_arrivals) =
            (Duration::from_secs(5), Duration::from_secs(1), 6);
        first.absorb(second);
        assert_eq!((first.calls, first.failed(), first.dropped_arrivals), (2, 3, 10));
        let by_code: Vec<(&str, u64)> = first.errors.iter().map(|(code, count)| (code.as_str(), *count)).collect();
        assert_eq!(by_code, [("DeadlineExceeded", 2), ("Internal", 1)]);
        assert!(first.first_error.as_deref().is_some_and(|error| error.contains("worker a did not answer")));
        assert_eq!((first.tokens, first.assignments), (16, 32));
        assert_eq!((first.dropped, first.rerouted, first.refused), (11, 22, 33));
        assert_eq!(first.expert_load, [10, 6]);
        assert_eq!(first.mean_router_stats().imbalance, 2.0);
        assert_eq!(first.attention_total, Duration::from_micros(60));
        let (dispatch, combine) = (Duration::from_micros(600), Duration::from_micros(200));
        assert_eq!((first.dispatch_total, first.combine_transfer_total), (dispatch, combine));
        assert_eq!((first.dispatch_span_total, first.combine_span_total), (dispatch, combine));
        assert_eq!((first.measured, first.elapsed), (Duration::from_secs(7), Duration::from_secs(4)));
        assert!(
            first.latency.equivalent(first.latency_at(1.0).as_micros() as u64, 4_000),
            "failed calls have no latency"
        );
        // 16 tokens and 2 calls over the 7 s measured, which outlasted the 4 s the calls took ...
        assert_eq!((first.tokens_per_second(), first.calls_per_second()), (16.0 / 7.0, 2.0 / 7.0));
        // ... or over the time the window's calls took, where it outlasted the window.
        first.elapsed = Duration::from_secs(8);
        assert_eq!((first.tokens_per_second(), first.calls_per_second()), (2.0, 0.25));
    }

    /// A measurement in rounds reads as one: counts, histograms, phases and loads add up.
    #[tokio::test]
    async fn a_report_absorbs_a_later_rounds_calls() {
        let model = tiny_model();
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
        let model = tiny_model();
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
        // A histogram counts at least 1 µs a call: the means show the calls' own times came through.
        assert!(summary.wall_mean_ms > 0.0 && summary.phases.compute_mean_ms > 0.0, "{:?}", summary.phases);
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
        let model = tiny_model();
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
