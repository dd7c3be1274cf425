//! The load-test engine behind `switchyard loadtest` and `switchyard local --loadtest`: N concurrent
//! callers in a closed loop against the distributed layer or the in-process reference, a warm-up
//! that is not measured, and a report with throughput, latency percentiles (HDR histogram), errors
//! by gRPC code, overflow, bytes and the mean time breakdown.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

use crate::client::MoeClient;
use crate::error::ClientError;
use crate::reference::ReferenceLayer;
use crate::router::{RoutingOverrides, RoutingSummary};
use crate::stats::RouterStats;
use crate::timing::{ByteCounts, TimeBreakdown};

/// What load to apply.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub concurrency: usize,
    /// Measured time, after the warm-up. The test ends at whichever of duration and requests comes first.
    pub duration: Duration,
    /// Most measured calls in total.
    pub requests: Option<u64>,
    pub tokens_per_call: usize,
    pub layer: u32,
    pub warmup: Duration,
    /// Seed of the generated hidden states.
    pub seed: u64,
    pub routing: RoutingOverrides,
}

/// Where calls go.
#[derive(Debug, Clone)]
pub enum Target {
    Distributed(Arc<MoeClient>),
    Reference(Arc<ReferenceLayer>),
}

impl Target {
    fn d_model(&self) -> Option<usize> {
        match self {
            Target::Distributed(client) => client.table().map(|table| table.model.d_model as usize),
            Target::Reference(reference) => Some(reference.model().d_model as usize),
        }
    }

    async fn call(
        &self,
        layer: u32,
        hidden: Arc<Vec<f32>>,
        routing: RoutingOverrides,
    ) -> Result<CallOutcome, ClientError> {
        match self {
            // The distributed client carries its overrides in its options.
            Target::Distributed(client) => {
                let output = client.forward(layer, &hidden).await?;
                Ok(CallOutcome { routing: output.routing, timing: output.timing, bytes: output.bytes })
            }
            Target::Reference(reference) => {
                let reference = reference.clone();
                let output =
                    tokio::task::spawn_blocking(move || reference.forward(layer, &hidden, &routing)).await.map_err(
                        |error| ClientError::InvalidInput { field: "reference", reason: error.to_string() },
                    )??;
                Ok(CallOutcome { routing: output.routing, timing: output.timing, bytes: ByteCounts::default() })
            }
        }
    }
}

struct CallOutcome {
    routing: RoutingSummary,
    timing: TimeBreakdown,
    bytes: ByteCounts,
}

/// Everything a load test measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub target: String,
    pub concurrency: usize,
    pub tokens_per_call: usize,
    pub measured: Duration,
    pub calls: u64,
    /// Failed calls by gRPC code name.
    pub errors: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    pub tokens: u64,
    pub assignments: u64,
    pub dropped: u64,
    pub rerouted: u64,
    /// Router statistics summed over calls (see [`LoadReport::mean_router_stats`]).
    pub router_stats_total: RouterStats,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
    pub timing_total: TimeBreakdown,
    pub bytes_total: ByteCounts,
}

impl LoadReport {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.measured.as_secs_f64().max(1e-9)
    }

    pub fn calls_per_second(&self) -> f64 {
        self.calls as f64 / self.measured.as_secs_f64().max(1e-9)
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

    /// The human-readable summary.
    pub fn render(&self) -> String {
        let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1e3);
        let mut text = String::new();
        let calls = self.calls.max(1);
        text.push_str(&format!(
            "{}: {} tokens/call, concurrency {}, measured {:.1} s\n",
            self.target,
            self.tokens_per_call,
            self.concurrency,
            self.measured.as_secs_f64()
        ));
        text.push_str(&format!("  calls       {} ok, {} failed\n", self.calls, self.failed()));
        for (code, count) in &self.errors {
            text.push_str(&format!("    {code}: {count}\n"));
        }
        if let Some(error) = &self.first_error {
            text.push_str(&format!("    first error: {error}\n"));
        }
        text.push_str(&format!(
            "  throughput  {:.0} tokens/s ({:.1} calls/s)\n",
            self.tokens_per_second(),
            self.calls_per_second()
        ));
        text.push_str(&format!(
            "  latency     p50 {}  p90 {}  p99 {}  max {}\n",
            ms(self.latency_at(0.50)),
            ms(self.latency_at(0.90)),
            ms(self.latency_at(0.99)),
            ms(Duration::from_micros(self.latency.max()))
        ));
        let dropped_share = 100.0 * self.dropped as f64 / self.assignments.max(1) as f64;
        text.push_str(&format!(
            "  overflow    {} of {} assignments dropped ({dropped_share:.2}%), {} re-routed\n",
            self.dropped, self.assignments, self.rerouted
        ));
        let stats = self.mean_router_stats();
        text.push_str(&format!(
            "  router      imbalance {:.3} (max/mean load) | switch aux loss {:.5} | importance CV² {:.4} | z-loss {:.4}\n",
            stats.imbalance, stats.switch_aux_loss, stats.importance_cv2, stats.z_loss
        ));
        if self.bytes_total.message_sent > 0 {
            text.push_str(&format!(
                "  bytes/call  sent {} B ({} B payload), received {} B ({} B payload)\n",
                self.bytes_total.message_sent / calls,
                self.bytes_total.payload_sent / calls,
                self.bytes_total.message_received / calls,
                self.bytes_total.payload_received / calls
            ));
        }
        let mean = self.mean_timing();
        let phases: Vec<String> = TimeBreakdown::PHASES
            .iter()
            .zip(mean.phases())
            .map(|(name, time)| format!("{name} {}", ms(time)))
            .collect();
        text.push_str(&format!("  time/call   {} | wall {}\n", phases.join(" | "), ms(mean.wall)));
        text
    }
}

/// Generated hidden states: a few distinct batches per caller, reused, so generation is not measured.
fn batches(seed: u64, tokens: usize, d_model: usize) -> Vec<Arc<Vec<f32>>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..4).map(|_| Arc::new((0..tokens * d_model).map(|_| rng.random_range(-1.7f32..1.7)).collect())).collect()
}

struct Shared {
    report: Mutex<LoadReport>,
    claimed: AtomicU64,
}

/// Runs `spec` against `target`; `name` labels the report.
pub async fn run(target: Target, spec: LoadSpec, name: &str) -> Result<LoadReport, ClientError> {
    let d_model =
        target.d_model().ok_or(ClientError::NoTable { coordinator: "(load test)".into(), waited: Duration::ZERO })?;
    let report = LoadReport {
        target: name.to_owned(),
        concurrency: spec.concurrency,
        tokens_per_call: spec.tokens_per_call,
        measured: Duration::ZERO,
        calls: 0,
        errors: BTreeMap::new(),
        first_error: None,
        tokens: 0,
        assignments: 0,
        dropped: 0,
        rerouted: 0,
        router_stats_total: RouterStats::default(),
        latency: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
        timing_total: TimeBreakdown::default(),
        bytes_total: ByteCounts::default(),
    };
    let shared = Arc::new(Shared { report: Mutex::new(report), claimed: AtomicU64::new(0) });
    let started = Instant::now();
    let measure_from = started + spec.warmup;
    let deadline = measure_from + spec.duration;
    let callers = (0..spec.concurrency.max(1)).map(|caller| {
        let (target, spec, shared) = (target.clone(), spec.clone(), shared.clone());
        tokio::spawn(async move {
            let inputs = batches(spec.seed.wrapping_add(caller as u64), spec.tokens_per_call, d_model);
            let mut call_index = 0usize;
            loop {
                let call_started = Instant::now();
                if call_started >= deadline {
                    return;
                }
                let measured = call_started >= measure_from;
                if measured
                    && let Some(limit) = spec.requests
                    && shared.claimed.fetch_add(1, Ordering::Relaxed) >= limit
                {
                    return;
                }
                let hidden = inputs[call_index % inputs.len()].clone();
                call_index += 1;
                let outcome = target.call(spec.layer, hidden, spec.routing).await;
                if !measured {
                    continue;
                }
                let latency = call_started.elapsed();
                let mut report = shared.report.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                match outcome {
                    Ok(outcome) => {
                        report.calls += 1;
                        report.tokens += outcome.routing.tokens as u64;
                        report.assignments += outcome.routing.assignments as u64;
                        report.dropped += outcome.routing.dropped as u64;
                        report.rerouted += outcome.routing.rerouted as u64;
                        report.router_stats_total += outcome.routing.stats;
                        report.timing_total += outcome.timing;
                        report.bytes_total += outcome.bytes;
                        let micros = latency.as_micros().clamp(1, 600_000_000) as u64;
                        let _ = report.latency.record(micros);
                    }
                    Err(error) => {
                        *report.errors.entry(format!("{:?}", error.code())).or_default() += 1;
                        report.first_error.get_or_insert_with(|| error.to_string());
                    }
                }
            }
        })
    });
    futures::future::join_all(callers).await;
    let mut report = shared.report.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    report.measured = Instant::now().min(deadline).saturating_duration_since(measure_from);
    Ok(report)
}
