//! [`LoadReport`]: everything a load test measured, tallied call by call (latency and per-phase
//! HDR histograms, errors by gRPC code, overflow, bytes, transfers, the ledger), and rounds of the
//! same load added into one.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use switchyard_router_client::error::ClientError;
use switchyard_router_client::ledger::{CommLedger, WorkerCall};
use switchyard_router_client::stats::RouterStats;
use switchyard_router_client::timing::{ByteCounts, TimeBreakdown};

use super::LoadSpec;
use super::arrival::Arrival;
use super::target::CallOutcome;

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
    pub fn empty(name: &str, spec: &LoadSpec) -> Self {
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

    /// Counts one measured call that took `latency`.
    pub(super) fn record(&mut self, outcome: Result<CallOutcome, ClientError>, latency: Duration) {
        match outcome {
            Ok(outcome) => {
                self.calls += 1;
                self.tokens += outcome.routing.tokens as u64;
                self.assignments += outcome.routing.assignments as u64;
                self.dropped += outcome.routing.dropped as u64;
                self.rerouted += outcome.routing.rerouted as u64;
                self.refused += outcome.routing.refused as u64;
                self.router_stats_total += outcome.routing.stats;
                self.timing_total += outcome.timing;
                self.bytes_total += outcome.bytes;
                let _ = self.latency.record(micros(latency));
                for (histogram, phase) in self.phase_histograms.iter_mut().zip(outcome.timing.phases()) {
                    let _ = histogram.record(micros(phase));
                }
                add_loads(&mut self.expert_load, &outcome.routing.tokens_per_expert);
                self.attention_total += outcome.attention;
                // A step's layers run one after the other: its transfers add up, each the slowest
                // worker's of its layer.
                let (mut dispatch, mut combine_transfer) = (Duration::ZERO, Duration::ZERO);
                for (layer, workers) in &outcome.workers {
                    self.ledger.record(*layer, workers);
                    let slowest =
                        |time: fn(&WorkerCall) -> Duration| workers.iter().map(time).max().unwrap_or_default();
                    dispatch += slowest(|call| call.dispatch);
                    combine_transfer += slowest(|call| call.combine_transfer);
                    self.dispatch_span_total += slowest(WorkerCall::dispatch_span);
                    self.combine_span_total += slowest(WorkerCall::combine_span);
                }
                self.dispatch_total += dispatch;
                self.combine_transfer_total += combine_transfer;
                if outcome.workers.iter().any(|(_, workers)| !workers.is_empty()) {
                    let _ = self.dispatch_histogram.record(micros(dispatch));
                    let _ = self.combine_transfer_histogram.record(micros(combine_transfer));
                }
            }
            Err(error) => {
                *self.errors.entry(format!("{:?}", error.code())).or_default() += 1;
                self.first_error.get_or_insert_with(|| error.to_string());
            }
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

/// Microseconds from 1 µs to 10 minutes, 3 significant digits.
pub(super) fn micros_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub(super) fn micros(duration: Duration) -> u64 {
    duration.as_micros().clamp(1, 600_000_000) as u64
}
