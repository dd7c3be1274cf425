//! The compute thread: the only place this worker touches libtorch after start-up.
//!
//! One dedicated OS thread owns the resident experts (tch tensors are `Send`, not `Sync`) and takes
//! [`Work`] from the [`Scheduler`] in order. A step holds one merged batch per expert with queued
//! rows: one upload of all their rows, every expert's forward launched back to back under
//! `no_grad` (a GPU runs them without the host waiting in between), one download of every answer
//! into one host buffer that the answers slice without copying, each sent by its `oneshot`. The
//! async runtime never waits on a tch call.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchyard_experts::{Expert, kind_of};
use switchyard_model::ExpertId;
use switchyard_proto::wire::{FP8_BLOCK, WireDtype};
use tch::{Device, Kind, Tensor};

use crate::error::WorkerError;
use crate::metrics::WorkerMetrics;
use crate::scheduler::{Batch, Command, QueuedRows, RowsOut, Scheduler, Work};
use crate::staging::Staging;

/// The tch kind of a dtype's values (FP8 rows also carry scales: [`wire_rows`]).
pub fn tch_kind(dtype: WireDtype) -> Kind {
    match dtype {
        WireDtype::F16 => Kind::Half,
        WireDtype::Bf16 => Kind::BFloat16,
        WireDtype::F32 => Kind::Float,
        WireDtype::Fp8E4m3 => Kind::Float8e4m3fn,
    }
}

/// `rows` wire rows of `dtype` and width `d_model` at byte `offset` of the staged `u8` tensor, as
/// a `[rows, d_model]` tensor on its device: a view for f32, f16 and bf16; for FP8, the codes
/// times their block scales (in f32), computed where the rows are.
fn wire_rows(staged: &Tensor, offset: usize, dtype: WireDtype, rows: usize, d_model: usize) -> Tensor {
    let (rows, width, row_bytes) = (rows as i64, d_model as i64, dtype.row_bytes(d_model) as i64);
    let bytes = staged.narrow(0, offset as i64, rows * row_bytes);
    if dtype != WireDtype::Fp8E4m3 {
        return bytes.view_dtype(tch_kind(dtype)).view([rows, width]);
    }
    let bytes = bytes.view([rows, row_bytes]);
    let values = bytes.narrow(1, 0, width).view_dtype(Kind::Float8e4m3fn).to_kind(Kind::Float);
    let blocks = d_model.div_ceil(FP8_BLOCK) as i64;
    let scales = bytes.narrow(1, width, 4 * blocks).contiguous().view_dtype(Kind::Float);
    values * scales.repeat_interleave_self_int(FP8_BLOCK as i64, 1, None).narrow(1, 0, width)
}

/// Starts the compute thread; it returns once [`Scheduler::stop`] was called and the queues drained.
pub fn spawn(
    scheduler: Arc<Scheduler>,
    device: Device,
    threads: i32,
    metrics: WorkerMetrics,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("switchyard-compute".into()).spawn(move || {
        // The BLAS thread count is per thread: set on `main` only, this thread's matrix products
        // would use every core.
        tch::set_num_threads(threads);
        let _no_grad = tch::no_grad_guard();
        let mut experts: HashMap<ExpertId, Expert> = HashMap::new();
        let mut staging = Staging::new(device);
        loop {
            match scheduler.next_work() {
                Work::Step(batches) => run_step(&experts, batches, &mut staging, &metrics),
                Work::Command(Command::Install { experts: loaded, done }) => {
                    for (key, expert, limit_tokens) in loaded {
                        let d_model = expert_width(&expert);
                        experts.insert(key, expert);
                        scheduler.open_queue(key, d_model, limit_tokens);
                    }
                    let _ = done.send(());
                }
                Work::Command(Command::Remove { experts: keys, done }) => {
                    let mut removed = Vec::new();
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
                            run_step(&experts, vec![Batch { expert: key, d_model, entries }], &mut staging, &metrics);
                        }
                        if experts.remove(&key).is_some() {
                            removed.push(key);
                        }
                    }
                    let _ = done.send(removed);
                }
                Work::Stop => break,
            }
        }
        tracing::info!("compute thread stopped");
    })
}

fn expert_width(expert: &Expert) -> usize {
    expert.d_model() as usize
}

/// Runs one step: every batch's rows go to the device in one upload, every expert's forward is
/// launched back to back (on a GPU they queue without the host waiting between them), and every
/// answer comes back in one download into one host buffer that the answers slice.
fn run_step(experts: &HashMap<ExpertId, Expert>, batches: Vec<Batch>, staging: &mut Staging, metrics: &WorkerMetrics) {
    let (batches, unloaded): (Vec<Batch>, Vec<Batch>) =
        batches.into_iter().partition(|batch| experts.contains_key(&batch.expert));
    for batch in unloaded {
        for (entry, _) in batch.entries {
            let _ = entry.reply.send(Err(WorkerError::Unavailable(format!("{} was unloaded", batch.expert))));
        }
    }
    if batches.is_empty() {
        return;
    }
    let started = Instant::now();
    let outputs = catch_unwind(AssertUnwindSafe(|| compute_step(experts, &batches, staging)));
    let elapsed = started.elapsed();
    let answers = match outputs {
        Ok(answers) => answers,
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown libtorch error".to_owned());
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
        for ((entry, queue_wait), data) in batch.entries.into_iter().zip(answers) {
            metrics.observe_queue_wait(queue_wait);
            let answer = RowsOut {
                dtype: entry.output_dtype,
                tokens: entry.tokens,
                data,
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

/// The step's libtorch work; returns each batch's answers, entry by entry, in their output dtypes.
fn compute_step(experts: &HashMap<ExpertId, Expert>, batches: &[Batch], staging: &mut Staging) -> Vec<Vec<Bytes>> {
    // Runs: the consecutive entries of a batch that share a wire dtype, viewed in place as one tensor.
    let runs: Vec<Vec<Vec<&QueuedRows>>> = batches
        .iter()
        .map(|batch| {
            let mut runs: Vec<Vec<&QueuedRows>> = Vec::new();
            for (entry, _) in &batch.entries {
                match runs.last_mut() {
                    Some(run) if run[0].dtype == entry.dtype => run.push(entry),
                    _ => runs.push(vec![entry]),
                }
            }
            runs
        })
        .collect();
    let slices: Vec<Vec<&[u8]>> =
        runs.iter().flatten().map(|run| run.iter().map(|entry| &entry.data[..]).collect()).collect();
    let (staged, offsets) = staging.upload(&slices);
    let mut offsets = offsets.into_iter();

    let mut downloads = Vec::new();
    let mut answer_sizes = Vec::with_capacity(batches.len());
    for (batch, runs) in batches.iter().zip(&runs) {
        let expert = &experts[&batch.expert];
        let span = tracing::debug_span!("expert_batch", expert = %batch.expert, tokens = batch.tokens(), requests = batch.entries.len());
        for (entry, _) in &batch.entries {
            span.follows_from(&entry.request_span);
        }
        let _entered = span.enter();
        let inputs: Vec<Tensor> = runs
            .iter()
            .map(|run| {
                let offset = offsets.next().expect("one offset per run");
                let rows = run.iter().map(|entry| entry.tokens).sum();
                wire_rows(&staged, offset, run[0].dtype, rows, batch.d_model)
            })
            .collect();
        let input = match &inputs[..] {
            [only] => only.shallow_clone(),
            several => {
                Tensor::cat(&several.iter().map(|run| run.to_kind(kind_of(expert.dtype()))).collect::<Vec<_>>(), 0)
            }
        };
        let output = expert.forward(&input);
        let sizes = answers_as_bytes(&output, batch, &mut downloads);
        answer_sizes.push(sizes);
    }
    let host = Bytes::from(staging.download(&downloads));
    let mut offset = 0;
    answer_sizes
        .into_iter()
        .map(|sizes| {
            sizes
                .into_iter()
                .map(|size| {
                    let answer = host.slice(offset..offset + size);
                    offset += size;
                    answer
                })
                .collect()
        })
        .collect()
}

/// Queues `output`'s rows for download as flat `u8` tensors in each entry's output dtype (one
/// conversion for the whole batch when they agree, as they almost always do); returns each entry's
/// answer size in bytes.
fn answers_as_bytes(output: &Tensor, batch: &Batch, downloads: &mut Vec<Tensor>) -> Vec<usize> {
    let as_bytes =
        |rows: &Tensor, dtype: WireDtype| rows.to_kind(tch_kind(dtype)).contiguous().view_dtype(Kind::Uint8).view([-1]);
    let answer_size = |entry: &QueuedRows| entry.tokens * batch.d_model * entry.output_dtype.element_size();
    let first_dtype = batch.entries[0].0.output_dtype;
    if batch.entries.iter().all(|(entry, _)| entry.output_dtype == first_dtype) {
        downloads.push(as_bytes(output, first_dtype));
    } else {
        let mut start = 0;
        for (entry, _) in &batch.entries {
            downloads.push(as_bytes(&output.narrow(0, start, entry.tokens as i64), entry.output_dtype));
            start += entry.tokens as i64;
        }
    }
    batch.entries.iter().map(|(entry, _)| answer_size(entry)).collect()
}

/// Seconds as microseconds for the wire.
pub fn micros(duration: Duration) -> u64 {
    duration.as_micros().min(u128::from(u64::MAX)) as u64
}
