//! [`ExpertWorker`]: the worker's logic as a plain struct with no tonic types, so it is tested
//! without a network. The gRPC service in [`crate::service`] is a thin adapter over it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchyard_experts::Expert;
use switchyard_model::ExpertId;
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::{ModelSpec, WeightDtype};
use switchyard_proto::wire::WireDtype;
use tch::Device;
use tokio::sync::oneshot;

use crate::compute;
use crate::error::WorkerError;
use crate::metrics::WorkerMetrics;
use crate::request::ForwardBatch;
use crate::scheduler::{Arrival, BatchingConfig, Command, QueueSnapshot, Scheduler};
use crate::staging::Transfers;

/// What a worker is started with.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub device: Device,
    /// libtorch intra-op threads of the compute thread (BLAS's count is per thread).
    pub torch_threads: i32,
    pub batching: BatchingConfig,
    /// Queue limit of experts loaded without one (the coordinator normally sends the capacity).
    pub default_queue_limit_tokens: usize,
    /// Serve identity experts (input back, no compute) instead of the model's: pure communication.
    pub identity_experts: bool,
    /// How long each step holds the compute thread at least (spinning): with identity experts, a
    /// stand-in for compute time without compute (`--identity-hold-us`).
    pub step_hold: Duration,
    /// Compute the experts of a stack in one grouped product (`--grouped-experts`, [`crate::stacks`]).
    pub grouped_experts: bool,
    /// The dtype experts are resident in and compute in; `None`: [`ModelSpec::resident_dtype`]'s
    /// default (the checkpoint's own; for synthetic weights bf16 on CUDA, f32 on CPU).
    pub dtype: Option<WeightDtype>,
    /// The most bytes of weights this worker holds; a load past it is refused before anything is
    /// allocated. `None`: no bound (tests, the in-process reference).
    pub memory_bytes: Option<u64>,
    /// Which checkpoint directories a load may name.
    pub checkpoints: CheckpointAccess,
    /// On a CPU, move each step's rows and answers as on a GPU (one upload carrying the rows,
    /// token-major indices and weights and grouped row ends; one download of every answer) rather
    /// than in place: the tests' way to run the GPU's bookkeeping where no GPU is. A GPU always
    /// moves them so. See [`crate::staging::Transfers`].
    pub copied_transfers_on_cpu: bool,
}

impl WorkerOptions {
    /// A worker serving the process that starts it (the in-process reference layer, tests) on
    /// `device`: one libtorch thread; every row at once (no batch wait, no bound on a batch or a
    /// queue); the model's dtype; no memory bound; any checkpoint (the caller is this process).
    /// Fields are public: change what a use needs.
    pub fn in_process(device: Device) -> Self {
        Self {
            device,
            torch_threads: 1,
            batching: BatchingConfig { batch_wait: Duration::ZERO, max_batch_tokens: usize::MAX },
            default_queue_limit_tokens: usize::MAX,
            identity_experts: false,
            step_hold: Duration::ZERO,
            grouped_experts: false,
            dtype: None,
            memory_bytes: None,
            checkpoints: CheckpointAccess::Anywhere,
            copied_transfers_on_cpu: false,
        }
    }
}

/// Which checkpoint directories a `LoadExperts` may make this worker read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointAccess {
    /// Any: the caller is this process (the in-process reference, tests).
    Anywhere,
    /// Only directories under this one, symlinks followed (`--model-root`).
    Under(std::path::PathBuf),
    /// None: a served worker without `--model-root` serves synthetic models only.
    Nowhere,
}

impl CheckpointAccess {
    /// Refuses `dir` unless this access allows it; the message names the field and the rule, not
    /// what is on disk.
    fn check(&self, dir: &str) -> Result<(), WorkerError> {
        let refuse = |reason: String| Err(WorkerError::invalid("model.checkpoint", reason));
        match self {
            CheckpointAccess::Anywhere => Ok(()),
            CheckpointAccess::Nowhere => {
                refuse("this worker reads checkpoints only under --model-root, which is not set".to_owned())
            }
            CheckpointAccess::Under(root) => {
                let inside = std::fs::canonicalize(dir)
                    .ok()
                    .zip(std::fs::canonicalize(root).ok())
                    .is_some_and(|(dir, root)| dir.starts_with(root));
                if inside { Ok(()) } else { refuse(format!("{dir} is not a directory under --model-root")) }
            }
        }
    }
}

/// Builds `keys` of `spec` on `device`: from its checkpoint (reading only these experts' tensors)
/// or from the seed, or as identity experts. All or nothing: the first failure names the expert,
/// the tensor and the file.
fn build_experts(
    spec: &ModelSpec,
    keys: Vec<ExpertId>,
    device: Device,
    dtype: Option<WeightDtype>,
    identity: bool,
) -> Result<Vec<(ExpertId, Expert)>, WorkerError> {
    let _no_grad = tch::no_grad_guard();
    if identity {
        return Ok(keys.into_iter().map(|key| (key, Expert::identity(spec.d_model as usize, device))).collect());
    }
    let dtype = spec.resident_dtype(dtype, device.is_cuda());
    let Some(dir) = &spec.checkpoint else {
        return Ok(keys
            .into_iter()
            .map(|key| (key, Expert::synthetic(spec, key.layer, key.expert, device, dtype)))
            .collect());
    };
    let Some(first) = keys.first().copied() else {
        return Ok(Vec::new());
    };
    let checkpoint = Checkpoint::open(std::path::Path::new(dir))
        .map_err(|error| WorkerError::Load { expert: first, reason: error.to_string() })?;
    keys.into_iter()
        .map(|key| {
            let weights = checkpoint
                .expert_weights(key.layer, key.expert)
                .map_err(|error| WorkerError::Load { expert: key, reason: error.to_string() })?;
            let (d_model, d_ff) = (spec.d_model as usize, spec.d_ff_of(key.expert) as usize);
            Ok((key, Expert::from_weights(&weights, spec.activation, d_model, d_ff, device, Some(dtype))))
        })
        .collect()
}

/// Queue limits of a load: routed experts take `routed`, shared experts `shared` (falling back to
/// `routed`); `None` keeps the worker's default.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueLimits {
    pub routed: Option<usize>,
    pub shared: Option<usize>,
}

/// One expert's answer to one request.
#[derive(Debug)]
pub struct ExpertRowsOut {
    pub expert: ExpertId,
    pub dtype: WireDtype,
    pub tokens: usize,
    pub width: usize,
    pub data: Bytes,
    pub queue_wait: Duration,
    pub compute: Duration,
    pub batch_tokens: usize,
}

/// The answer to one forward request, parts in request order.
#[derive(Debug)]
pub struct ForwardOutcome {
    pub request_id: u64,
    /// Per part: its rows' outputs (expert-major), or only its timing (token-major: empty data).
    pub outputs: Vec<ExpertRowsOut>,
    /// A token-major request's answer: each token's gate-weighted sum over its experts here.
    pub combined: Option<CombinedOut>,
    pub handler_time: Duration,
}

/// `[tokens, width]` of `dtype`.
#[derive(Debug)]
pub struct CombinedOut {
    pub dtype: WireDtype,
    pub tokens: usize,
    pub width: usize,
    pub data: Bytes,
}

/// A resident expert's spec and the bytes its weights hold on the device.
#[derive(Debug)]
struct Resident {
    spec: ModelSpec,
    bytes: u64,
}

#[derive(Debug)]
pub struct ExpertWorker {
    scheduler: Arc<Scheduler>,
    options: WorkerOptions,
    /// What each resident expert was built from: a load with another spec rebuilds it.
    resident: Mutex<HashMap<ExpertId, Resident>>,
    metrics: WorkerMetrics,
    compute_thread: Mutex<Option<JoinHandle<()>>>,
}

impl ExpertWorker {
    /// Starts the compute thread. Call from inside a tokio runtime.
    pub fn start(options: WorkerOptions, metrics: WorkerMetrics) -> std::io::Result<Arc<Self>> {
        let scheduler = Arc::new(Scheduler::new(options.batching));
        let thread = compute::spawn(
            scheduler.clone(),
            options.device,
            Transfers::for_device(options.device, options.copied_transfers_on_cpu),
            options.torch_threads,
            options.step_hold,
            options.grouped_experts,
            metrics.clone(),
        )?;
        Ok(Arc::new(Self {
            scheduler,
            options,
            resident: Mutex::new(HashMap::new()),
            metrics,
            compute_thread: Mutex::new(Some(thread)),
        }))
    }

    pub fn device(&self) -> Device {
        self.options.device
    }

    fn resident(&self) -> std::sync::MutexGuard<'_, HashMap<ExpertId, Resident>> {
        self.resident.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs every part of `batch` through its expert; refused whole if any queue is full.
    pub async fn forward(&self, batch: ForwardBatch) -> Result<ForwardOutcome, WorkerError> {
        self.forward_arrived(batch, None).await
    }

    /// Counts a request as on its way in (queued rows wait for it, up to the batch wait bound)
    /// until the returned [`Arrival`] is dropped or handed to [`ExpertWorker::forward_arrived`].
    pub fn announce(&self) -> Arrival {
        self.scheduler.announce()
    }

    /// [`ExpertWorker::forward`] of a request announced as `arrival`, which ends at its admission.
    pub async fn forward_arrived(
        &self,
        batch: ForwardBatch,
        arrival: Option<Arrival>,
    ) -> Result<ForwardOutcome, WorkerError> {
        let started = Instant::now();
        self.metrics.requests.inc();
        let request_id = batch.request_id;
        let tokens = batch.total_tokens() as u64;
        let token_major = batch.token_major.as_ref().map(|shared| {
            let dtype = batch.output_dtype.unwrap_or(shared.dtype.answer_dtype());
            (shared.tokens, shared.width, dtype)
        });
        let shapes: Vec<(ExpertId, usize, usize)> =
            batch.parts.iter().map(|part| (part.expert, part.tokens, part.width)).collect();
        let admitted = self.scheduler.admit(batch);
        drop(arrival);
        if admitted.is_ok() || matches!(admitted, Err(WorkerError::QueueFull { .. })) {
            for (expert, rows, _) in &shapes {
                self.metrics.observe_expert(expert.layer, expert.expert, *rows as u64, admitted.is_ok());
            }
        }
        let receivers = match admitted {
            Ok(receivers) => receivers,
            Err(error) => {
                if matches!(error, WorkerError::QueueFull { .. }) {
                    self.metrics.rejected_tokens.inc_by(tokens);
                }
                return Err(error);
            }
        };
        self.metrics.admitted_tokens.inc_by(tokens);
        self.metrics.queued_tokens.set(self.scheduler.queued_tokens() as i64);
        let answers = futures::future::join_all(receivers).await;
        let mut outputs = Vec::with_capacity(answers.len());
        let mut answers_combined = None;
        for ((expert, tokens, width), answer) in shapes.into_iter().zip(answers) {
            let rows = answer.map_err(|_| WorkerError::Unavailable("the compute thread stopped".into()))??;
            debug_assert_eq!(rows.tokens, tokens);
            if let Some(combined) = rows.combined {
                answers_combined = Some((rows.dtype, combined));
            }
            outputs.push(ExpertRowsOut {
                expert,
                dtype: rows.dtype,
                tokens,
                width,
                data: rows.data,
                queue_wait: rows.queue_wait,
                compute: rows.compute,
                batch_tokens: rows.batch_tokens,
            });
        }
        let combined = match token_major {
            None => None,
            // Tokens that chose none of this worker's experts sum to zero, whose bytes are zero
            // in every answer dtype; no part, no compute.
            Some((tokens, width, dtype)) if outputs.is_empty() => {
                Some(CombinedOut { dtype, tokens, width, data: Bytes::from(vec![0; tokens * dtype.row_bytes(width)]) })
            }
            Some((tokens, width, _)) => {
                let finished = answers_combined
                    .ok_or_else(|| WorkerError::Compute("a token-major request's sum never completed".to_owned()))?;
                Some(CombinedOut { dtype: finished.0, tokens, width, data: finished.1 })
            }
        };
        Ok(ForwardOutcome { request_id, outputs, combined, handler_time: started.elapsed() })
    }

    /// Makes `experts` of `spec` resident (building missing ones off the async runtime) and opens
    /// their queues with `limits` (or the worker's default). Already resident experts of the same
    /// spec only get their limit updated.
    /// Refuses to build `keys` of `spec` when their weights would not fit in what this worker
    /// offers beside what it holds: one request must not make it allocate without bound.
    fn check_memory(&self, spec: &ModelSpec, keys: &[ExpertId]) -> Result<(), WorkerError> {
        let (Some(offered), false) = (self.options.memory_bytes, self.options.identity_experts) else {
            return Ok(());
        };
        let dtype = spec.resident_dtype(self.options.dtype, self.options.device.is_cuda());
        let needed: u64 = keys.iter().map(|key| spec.expert_bytes_of(key.expert, dtype)).sum();
        let held = self.resident_bytes();
        if held.saturating_add(needed) <= offered {
            return Ok(());
        }
        Err(WorkerError::invalid(
            "experts",
            format!(
                "{} experts of d_model {} and d_ff {} need {needed} bytes in {dtype}; this worker offers {offered} and holds {held}",
                keys.len(),
                spec.d_model,
                spec.d_ff,
            ),
        ))
    }

    pub async fn load_experts(
        &self,
        spec: ModelSpec,
        mut experts: Vec<ExpertId>,
        limits: QueueLimits,
    ) -> Result<Vec<ExpertId>, WorkerError> {
        // A key listed twice is one expert: built twice, it was counted twice against the memory
        // offered and held twice while loading.
        let mut listed = HashSet::with_capacity(experts.len());
        experts.retain(|key| listed.insert(*key));
        if let Some(outside) = experts.iter().find(|key| !spec.contains(key)) {
            return Err(WorkerError::invalid(
                "experts",
                format!(
                    "{outside} is outside the model (MoE layers {}, {} experts)",
                    spec.describe_layers(),
                    spec.experts_per_layer + spec.shared_experts
                ),
            ));
        }
        let default_limit = self.options.default_queue_limit_tokens;
        let limit_of = |key: &ExpertId| {
            let shared = if spec.is_shared(key.expert) { limits.shared } else { None };
            shared.or(limits.routed).unwrap_or(default_limit)
        };
        let to_build: Vec<ExpertId> = {
            let resident = self.resident();
            experts.iter().filter(|key| resident.get(key).is_none_or(|built| built.spec != spec)).copied().collect()
        };
        if let Some(dir) = &spec.checkpoint {
            self.options.checkpoints.check(dir)?;
        }
        self.check_memory(&spec, &to_build)?;
        let device = self.options.device;
        let build_spec = spec.clone();
        let (dtype, identity) = (self.options.dtype, self.options.identity_experts);
        let built = tokio::task::spawn_blocking(move || build_experts(&build_spec, to_build, device, dtype, identity))
            .await
            .map_err(|error| WorkerError::Load {
                expert: experts.first().copied().unwrap_or_default(),
                reason: error.to_string(),
            })??;
        let built_keys: Vec<ExpertId> = built.iter().map(|(key, _)| *key).collect();
        let built_bytes: HashMap<ExpertId, u64> =
            built.iter().map(|(key, expert)| (*key, expert.resident_bytes())).collect();
        let built = built.into_iter().map(|(key, expert)| (key, expert, limit_of(&key))).collect();
        let (done, installed) = oneshot::channel();
        self.scheduler.submit(Command::Install { experts: built, done });
        installed.await.map_err(|_| WorkerError::Unavailable("the compute thread stopped".into()))?;
        // Experts already resident keep serving; they only get their (possibly new) limit.
        for key in experts.iter().filter(|key| !built_keys.contains(key)) {
            self.scheduler.open_queue(*key, spec.d_model as usize, limit_of(key));
        }
        let mut resident = self.resident();
        for key in &experts {
            let bytes = built_bytes.get(key).copied().or_else(|| resident.get(key).map(|built| built.bytes));
            resident.insert(*key, Resident { spec: spec.clone(), bytes: bytes.unwrap_or_default() });
        }
        self.metrics.resident_experts.set(resident.len() as i64);
        tracing::info!(
            built = built_keys.len(),
            experts = experts.len(),
            routed_limit = limits.routed,
            shared_limit = limits.shared,
            "experts loaded"
        );
        Ok(experts)
    }

    /// Closes the queues of `experts`, serves what they still hold, and frees them.
    pub async fn unload_experts(&self, experts: Vec<ExpertId>) -> Result<Vec<ExpertId>, WorkerError> {
        let (done, removed) = oneshot::channel();
        self.scheduler.submit(Command::Remove { experts, done });
        let removed = removed.await.map_err(|_| WorkerError::Unavailable("the compute thread stopped".into()))?;
        let mut resident = self.resident();
        for key in &removed {
            resident.remove(key);
        }
        self.metrics.resident_experts.set(resident.len() as i64);
        Ok(removed)
    }

    pub fn resident_experts(&self) -> Vec<ExpertId> {
        let mut keys: Vec<_> = self.resident().keys().copied().collect();
        keys.sort_by_key(|key| (key.layer, key.expert));
        keys
    }

    /// Bytes the resident experts' weights hold on the device, in the dtype they are resident in.
    pub fn resident_bytes(&self) -> u64 {
        self.resident().values().map(|built| built.bytes).sum()
    }

    pub fn queues(&self) -> Vec<QueueSnapshot> {
        self.scheduler.snapshot()
    }

    pub fn queued_tokens(&self) -> usize {
        self.scheduler.queued_tokens()
    }

    pub fn tokens_served(&self) -> u64 {
        self.scheduler.snapshot().iter().map(|queue| queue.counters.admitted_tokens).sum()
    }

    /// Refuses new requests, serves what is queued, and joins the compute thread.
    pub async fn shutdown(&self) {
        self.scheduler.stop();
        let thread = self.compute_thread.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{ExpertRowsIn, RowsSource};

    const D_MODEL: usize = 8;

    fn spec() -> ModelSpec {
        ModelSpec { d_model: D_MODEL as u32, d_ff: 16, experts_per_layer: 2, ..ModelSpec::default_synthetic() }
    }

    fn expert(expert: u32) -> ExpertId {
        ExpertId::new(0, expert)
    }

    /// A worker of identity experts whose every step keeps its compute thread busy for `hold`.
    fn identity_worker(hold: Duration) -> Arc<ExpertWorker> {
        let options =
            WorkerOptions { identity_experts: true, step_hold: hold, ..WorkerOptions::in_process(Device::Cpu) };
        ExpertWorker::start(options, WorkerMetrics::new()).expect("the compute thread starts")
    }

    /// `tokens` f32 rows of zeros for `expert`.
    fn request(request_id: u64, expert: ExpertId, tokens: usize) -> ForwardBatch {
        let rows = RowsSource::Own(Bytes::from(vec![0u8; tokens * D_MODEL * 4]));
        let part = ExpertRowsIn { index: 0, expert, dtype: WireDtype::F32, tokens, width: D_MODEL, rows };
        ForwardBatch { request_id, parts: vec![part], output_dtype: None, token_major: None }
    }

    fn limits(routed: usize) -> QueueLimits {
        QueueLimits { routed: Some(routed), shared: None }
    }

    fn queue_limits(worker: &ExpertWorker) -> Vec<(u32, usize)> {
        worker.queues().iter().map(|queue| (queue.expert.expert, queue.limit_tokens)).collect()
    }

    #[tokio::test]
    async fn loading_resident_experts_again_only_sets_their_limits() {
        let worker = identity_worker(Duration::ZERO);
        worker.load_experts(spec(), vec![expert(0)], limits(4)).await.expect("loads");
        assert_eq!(queue_limits(&worker), [(0, 4)]);
        let loaded = worker.load_experts(spec(), vec![expert(0), expert(1), expert(1)], limits(9)).await;
        assert_eq!(loaded.expect("loads"), [expert(0), expert(1)], "a key listed twice is one expert");
        assert_eq!(queue_limits(&worker), [(0, 9), (1, 9)], "the resident expert takes the new limit too");
        assert_eq!(worker.resident_experts(), [expert(0), expert(1)]);
        worker.shutdown().await;
    }

    #[tokio::test]
    async fn admitted_tokens_count_as_served_and_wait_queued_behind_a_step() {
        let worker = identity_worker(Duration::from_secs(1));
        worker.load_experts(spec(), vec![expert(0)], limits(100)).await.expect("loads");
        let first = tokio::spawn({
            let worker = worker.clone();
            async move { worker.forward(request(1, expert(0), 3)).await }
        });
        // Wait until the first request's rows left the queue for the step that holds them.
        let taken = async {
            while worker.tokens_served() < 3 || worker.queues()[0].queued_tokens > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), taken).await.expect("the first step starts");
        let second = tokio::spawn({
            let worker = worker.clone();
            async move { worker.forward(request(2, expert(0), 2)).await }
        });
        let queued = async {
            while worker.tokens_served() < 5 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), queued).await.expect("the second request is admitted");
        assert_eq!(worker.queued_tokens(), 2, "the second request waits for the step holding the first");
        for answered in [first, second] {
            answered.await.expect("the request task runs").expect("answered");
        }
        assert_eq!((worker.tokens_served(), worker.queued_tokens()), (5, 0));
        worker.shutdown().await;
    }

    #[tokio::test]
    async fn a_worker_shut_down_refuses_requests_and_its_compute_thread_ends() {
        let worker = identity_worker(Duration::ZERO);
        worker.load_experts(spec(), vec![expert(0)], limits(100)).await.expect("loads");
        worker.forward(request(1, expert(0), 1)).await.expect("served before the shutdown");
        worker.shutdown().await;
        let refused = worker.forward(request(2, expert(0), 1)).await.expect_err("shutting down");
        assert!(
            matches!(&refused, WorkerError::Unavailable(reason) if reason.contains("shutting down")),
            "{refused:?}"
        );
        assert!(worker.compute_thread.lock().expect("not poisoned").is_none(), "joined");
    }
}
