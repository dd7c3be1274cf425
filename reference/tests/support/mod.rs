//! What the in-process tests share: a real worker on the CPU.

use std::sync::Arc;
use std::time::Duration;

use switchyard_expert_worker::metrics::WorkerMetrics;
use switchyard_expert_worker::scheduler::BatchingConfig;
use switchyard_expert_worker::{ExpertWorker, QueueLimits, WorkerOptions};
use switchyard_model::{ExpertId, ModelSpec};

/// A one-thread CPU worker holding `experts` of `model`, each behind a queue of `limit` tokens,
/// whose batcher waits `batch_wait` for more rows before computing.
pub async fn cpu_worker(
    model: ModelSpec,
    experts: Vec<ExpertId>,
    limit: usize,
    batch_wait: Duration,
) -> Arc<ExpertWorker> {
    let options = WorkerOptions {
        device: tch::Device::Cpu,
        torch_threads: 1,
        batching: BatchingConfig { batch_wait, max_batch_tokens: 1 << 20 },
        default_queue_limit_tokens: limit,
        identity_experts: false,
        dtype: None,
        memory_bytes: None,
        checkpoints: switchyard_expert_worker::worker::CheckpointAccess::Anywhere,
    };
    let worker = ExpertWorker::start(options, WorkerMetrics::new()).expect("compute thread");
    worker.load_experts(model, experts, QueueLimits::default()).await.expect("load");
    worker
}
