//! The compute thread: the only place this worker touches libtorch after start-up.
//!
//! One dedicated OS thread owns the resident experts (tch tensors are `Send`, not `Sync`), takes
//! [`Work`] from the [`Scheduler`] in order, runs each merged batch as one forward under `no_grad`,
//! splits the outputs back to the requests and answers each by its `oneshot`. The async runtime
//! never waits on a tch call.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchyard_experts::Expert;
use switchyard_model::ExpertId;
use switchyard_proto::wire::WireDtype;
use tch::{Device, Kind, Tensor};

use crate::error::WorkerError;
use crate::metrics::WorkerMetrics;
use crate::scheduler::{Batch, Command, QueuedRows, RowsOut, Scheduler, Work};

pub fn tch_kind(dtype: WireDtype) -> Kind {
    match dtype {
        WireDtype::F16 => Kind::Half,
        WireDtype::Bf16 => Kind::BFloat16,
        WireDtype::F32 => Kind::Float,
    }
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
        loop {
            match scheduler.next_work() {
                Work::Batch(batch) => run_batch(&experts, batch, device, &metrics),
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
                            run_batch(&experts, Batch { expert: key, d_model, entries }, device, &metrics);
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

fn run_batch(experts: &HashMap<ExpertId, Expert>, batch: Batch, device: Device, metrics: &WorkerMetrics) {
    let Some(expert) = experts.get(&batch.expert) else {
        for (entry, _) in batch.entries {
            let _ = entry.reply.send(Err(WorkerError::Unavailable(format!("{} was unloaded", batch.expert))));
        }
        return;
    };
    let tokens = batch.tokens();
    // One span per merged forward, linked to the span of every request whose rows it computes.
    let span = tracing::debug_span!("expert_batch", expert = %batch.expert, tokens, requests = batch.entries.len());
    for (entry, _) in &batch.entries {
        span.follows_from(&entry.request_span);
    }
    let _entered = span.enter();
    let started = Instant::now();
    let outputs = catch_unwind(AssertUnwindSafe(|| forward_rows(expert, &batch, device)));
    let compute = started.elapsed();
    metrics.observe_batch(tokens, compute);
    match outputs {
        Ok(outputs) => {
            for ((entry, queue_wait), data) in batch.entries.into_iter().zip(outputs) {
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
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown libtorch error".to_owned());
            tracing::error!(expert = %batch.expert, %reason, "expert forward failed");
            for (entry, _) in batch.entries {
                let _ = entry.reply.send(Err(WorkerError::Compute(reason.clone())));
            }
        }
    }
}

/// One forward over every entry of `batch`; returns each entry's output bytes in its output dtype.
fn forward_rows(expert: &Expert, batch: &Batch, device: Device) -> Vec<Bytes> {
    let d_model = batch.d_model as i64;
    // Rows stay in their wire dtype until they are on the device; the expert converts them to the
    // dtype it computes in there (a no-op when the two agree, as bf16 on the wire and in compute do).
    let to_tensor = |entry: &QueuedRows| {
        Tensor::from_data_size(&entry.data, &[entry.tokens as i64, d_model], tch_kind(entry.dtype))
    };
    let input = match &batch.entries[..] {
        [(only, _)] => to_tensor(only),
        entries => Tensor::cat(&entries.iter().map(|(entry, _)| to_tensor(entry)).collect::<Vec<_>>(), 0),
    };
    let output = expert.forward(&input.to_device(device)).to_device(Device::Cpu);

    let first_dtype = batch.entries[0].0.output_dtype;
    if batch.entries.iter().all(|(entry, _)| entry.output_dtype == first_dtype) {
        // The common case: one conversion and one copy for the whole batch, then zero-copy slices.
        let whole = tensor_bytes(&output.to_kind(tch_kind(first_dtype)));
        let row_bytes = batch.d_model * whole.len() / (batch.tokens() * batch.d_model).max(1);
        let mut offset = 0;
        return batch
            .entries
            .iter()
            .map(|(entry, _)| {
                let slice = whole.slice(offset..offset + entry.tokens * row_bytes);
                offset += entry.tokens * row_bytes;
                slice
            })
            .collect();
    }
    let mut start = 0;
    batch
        .entries
        .iter()
        .map(|(entry, _)| {
            let rows = output.narrow(0, start, entry.tokens as i64).to_kind(tch_kind(entry.output_dtype));
            start += entry.tokens as i64;
            tensor_bytes(&rows)
        })
        .collect()
}

fn tensor_bytes(tensor: &Tensor) -> Bytes {
    let tensor = tensor.contiguous();
    let numel = tensor.numel();
    let mut buffer = vec![0u8; numel * tensor.kind().elt_size_in_bytes()];
    tensor.copy_data_u8(&mut buffer, numel);
    Bytes::from(buffer)
}

/// Seconds as microseconds for the wire.
pub fn micros(duration: Duration) -> u64 {
    duration.as_micros().min(u128::from(u64::MAX)) as u64
}
