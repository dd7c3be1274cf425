//! The compute thread: the only place this worker touches libtorch after start-up.
//!
//! One dedicated OS thread owns the resident experts (tch tensors are `Send`, not `Sync`) and the
//! per-token sums of token-major requests in progress, and takes [`Work`] from the [`Scheduler`] in
//! order. A step holds one merged batch per expert with queued rows; [`crate::step`] runs it (one
//! upload, forwards launched back to back under `no_grad`, one download); here each answer is sent
//! by its `oneshot` with its share of the step's time. The async runtime never waits on a tch call.

use std::collections::{BTreeSet, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use switchyard_experts::Expert;
use switchyard_model::ExpertId;
use tch::Device;

use crate::error::WorkerError;
use crate::metrics::WorkerMetrics;
use crate::scheduler::{Batch, Command, RowsOut, Scheduler, Work};
use crate::stacks::Stacks;
use crate::staging::{Staging, Transfers};
use crate::step::{Computed, EntryAnswer, compute_step};
use crate::sums::Sums;

/// Starts the compute thread; it returns once [`Scheduler::stop`] was called and the queues drained.
pub fn spawn(
    scheduler: Arc<Scheduler>,
    device: Device,
    transfers: Transfers,
    threads: i32,
    step_hold: Duration,
    grouped_experts: bool,
    metrics: WorkerMetrics,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("switchyard-compute".into()).spawn(move || {
        // The BLAS thread count is per thread: set on `main` only, this thread's matrix products
        // would use every core.
        tch::set_num_threads(threads);
        let _no_grad = tch::no_grad_guard();
        let mut experts: HashMap<ExpertId, Expert> = HashMap::new();
        let mut stacks = Stacks::new(grouped_experts);
        let mut staging = Staging::new(device, transfers);
        let mut sums = Sums::new(device, transfers);
        loop {
            match scheduler.next_work() {
                Work::Step(batches) => {
                    run_step(&experts, &stacks, batches, &mut staging, &mut sums, step_hold, &metrics);
                }
                Work::Command(Command::Install { experts: loaded, done }) => {
                    let mut layers = BTreeSet::new();
                    for (key, expert, limit_tokens) in loaded {
                        let d_model = expert_width(&expert);
                        experts.insert(key, expert);
                        scheduler.open_queue(key, d_model, limit_tokens);
                        layers.insert(key.layer);
                    }
                    for layer in layers {
                        stacks.restack(layer, &mut experts);
                    }
                    let _ = done.send(());
                }
                Work::Command(Command::Remove { experts: keys, done }) => {
                    let mut removed = Vec::new();
                    let layers: BTreeSet<u32> = keys.iter().map(|key| key.layer).collect();
                    for key in keys {
                        if let Some(pending) = scheduler.close_queue(&key) {
                            let d_model = experts.get(&key).map_or(0, expert_width);
                            let now = Instant::now();
                            let entries = pending
                                .into_iter()
                                .map(|entry| {
                                    let waited = now - entry.enqueued_at;
                                    (entry, waited)
                                })
                                .collect();
                            let batch = Batch { expert: key, d_model, entries };
                            run_step(&experts, &stacks, vec![batch], &mut staging, &mut sums, step_hold, &metrics);
                        }
                        if experts.remove(&key).is_some() {
                            removed.push(key);
                        }
                    }
                    for layer in layers {
                        stacks.restack(layer, &mut experts);
                    }
                    let _ = done.send(removed);
                }
                Work::Stop => break,
            }
        }
        tracing::info!("compute thread stopped");
    })
}

/// Keeps this thread busy until `deadline`, as a step that computes that long would.
fn hold_until(deadline: Instant) {
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

fn expert_width(expert: &Expert) -> usize {
    expert.d_model() as usize
}

/// Runs one step: every batch's rows go to the device in one upload, every expert's forward is
/// launched back to back (on a GPU they queue without the host waiting between them), and every
/// answer comes back in one download (see [`Staging::download`]).
fn run_step(
    experts: &HashMap<ExpertId, Expert>,
    stacks: &Stacks,
    batches: Vec<Batch>,
    staging: &mut Staging,
    sums: &mut Sums,
    hold: Duration,
    metrics: &WorkerMetrics,
) {
    // An expert unloaded with an empty queue leaves an empty batch: nothing to compute.
    let (batches, unloaded): (Vec<Batch>, Vec<Batch>) = batches
        .into_iter()
        .filter(|batch| !batch.entries.is_empty())
        .partition(|batch| experts.contains_key(&batch.expert));
    for batch in unloaded {
        for (entry, _) in batch.entries {
            let _ = entry.reply.send(Err(WorkerError::Unavailable(format!("{} was unloaded", batch.expert))));
        }
    }
    if batches.is_empty() {
        return;
    }
    let started = Instant::now();
    let outputs = catch_unwind(AssertUnwindSafe(|| compute_step(experts, stacks, &batches, staging, sums)));
    sums.forget_orphans();
    hold_until(started + hold);
    let elapsed = started.elapsed();
    let answers = match outputs {
        Ok(Computed { answers, grouped_batches, staged_bytes }) => {
            metrics.grouped_batches.inc_by(grouped_batches as u64);
            metrics.staged_bytes.inc_by(staged_bytes as u64);
            answers
        }
        Err(panic) => {
            let reason = switchyard_common::panic::message(&*panic, "unknown libtorch error");
            let experts: Vec<String> = batches.iter().map(|batch| batch.expert.to_string()).collect();
            tracing::error!(experts = %experts.join(", "), %reason, "expert step failed");
            for (entry, _) in batches.into_iter().flat_map(|batch| batch.entries) {
                let _ = entry.reply.send(Err(WorkerError::Compute(reason.clone())));
            }
            return;
        }
    };
    let shares = compute_shares(experts, &batches, elapsed);
    for ((batch, answers), compute) in batches.into_iter().zip(answers).zip(shares) {
        let tokens = batch.tokens();
        metrics.observe_batch(tokens, compute);
        for ((entry, queue_wait), EntryAnswer { data, combined }) in batch.entries.into_iter().zip(answers) {
            metrics.observe_queue_wait(queue_wait);
            let answer = RowsOut {
                dtype: entry.output_dtype,
                tokens: entry.tokens,
                data,
                combined,
                queue_wait,
                compute,
                batch_tokens: tokens,
            };
            let _ = entry.reply.send(Ok(answer));
        }
    }
}

/// Each batch's share of a step's time, by its multiply-adds (rows times the expert's weights; rows
/// alone for identity experts): the kernels of one step run back to back and are not timed apart.
fn compute_shares(experts: &HashMap<ExpertId, Expert>, batches: &[Batch], elapsed: Duration) -> Vec<Duration> {
    let work: Vec<f64> = batches
        .iter()
        .map(|batch| {
            let parameters = experts.get(&batch.expert).map_or(0, Expert::parameters).max(1);
            batch.tokens() as f64 * parameters as f64
        })
        .collect();
    let total: f64 = work.iter().sum();
    work.iter().map(|work| elapsed.mul_f64(work / total.max(f64::MIN_POSITIVE))).collect()
}

/// Seconds as microseconds for the wire.
pub fn micros(duration: Duration) -> u64 {
    duration.as_micros().min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use switchyard_model::{ModelSpec, WeightDtype};

    use super::*;
    use crate::scheduler::QueuedRows;

    /// Three tokens through an expert and one through another three times its size did the same
    /// multiply-adds, so they share the step's time evenly.
    #[test]
    fn a_step_s_time_is_shared_by_multiply_adds() {
        let small = ModelSpec { d_model: 4, d_ff: 6, ..ModelSpec::default_synthetic() };
        let large = ModelSpec { d_ff: 18, ..small.clone() };
        let experts = HashMap::from([
            (ExpertId::new(0, 0), Expert::synthetic(&small, 0, 0, Device::Cpu, WeightDtype::F32)),
            (ExpertId::new(0, 1), Expert::synthetic(&large, 0, 1, Device::Cpu, WeightDtype::F32)),
        ]);
        assert_eq!(experts[&ExpertId::new(0, 1)].parameters(), 3 * experts[&ExpertId::new(0, 0)].parameters());
        let batch = |expert: u32, tokens: &[usize]| Batch {
            expert: ExpertId::new(0, expert),
            d_model: 4,
            entries: tokens.iter().map(|&tokens| QueuedRows::unread(tokens)).collect(),
        };
        let step = Duration::from_millis(12);
        let even = compute_shares(&experts, &[batch(0, &[1, 2]), batch(1, &[1])], step);
        assert_eq!(even, [Duration::from_millis(6); 2]);
        let by_tokens = compute_shares(&experts, &[batch(0, &[1]), batch(0, &[3])], step);
        assert_eq!(by_tokens, [Duration::from_millis(3), Duration::from_millis(9)]);
    }

    #[test]
    fn durations_go_on_the_wire_as_whole_microseconds() {
        assert_eq!(micros(Duration::from_nanos(1_500_999)), 1500);
        assert_eq!(micros(Duration::MAX), u64::MAX, "saturates");
    }
}
