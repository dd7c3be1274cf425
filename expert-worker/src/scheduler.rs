//! Per-expert bounded queues and the choice of the next batch.
//!
//! TGI's queue shape, bounded: one [`ExpertQueue`] per served expert whose limit in tokens is the
//! expert capacity, enforced across every client. Admission is all-or-nothing per request: a request
//! whose rows would overflow any of its experts' queues is refused whole and queued work is not
//! touched. The compute thread asks [`Scheduler::next_work`] for its next job: a step of every
//! expert with queued rows, launched together. The decision itself, [`next_step`], is a pure
//! function of the queues, the clock and whether a request is on its way in ([`Arrival`]), tested
//! without threads.
//!
//! The lock is a `std::sync::Mutex` held for microseconds (push, pop, counters), never across an
//! await or a tensor operation.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchyard_experts::Expert;
use switchyard_model::ExpertId;
use switchyard_proto::wire::WireDtype;
use tokio::sync::oneshot;

use crate::error::WorkerError;
use crate::request::{ForwardBatch, RowsSource};

/// How the batcher merges queued rows.
#[derive(Debug, Clone, Copy)]
pub struct BatchingConfig {
    /// How long the oldest queued rows may wait for more rows of the same expert to join them,
    /// while a request is on its way in.
    pub batch_wait: Duration,
    /// Most rows in one forward; rows of one request are never split across forwards.
    pub max_batch_tokens: usize,
}

/// One request's rows for one expert, waiting in that expert's queue.
#[derive(Debug)]
pub struct QueuedRows {
    pub dtype: WireDtype,
    pub output_dtype: WireDtype,
    pub tokens: usize,
    pub rows: RowsSource,
    pub enqueued_at: Instant,
    pub reply: oneshot::Sender<Result<RowsOut, WorkerError>>,
    /// The client's id of the request the rows came with, for the compute step's span.
    pub request_id: u64,
    /// The span of the request the rows came with: the batch they join follows from it.
    pub request_span: tracing::Span,
}

#[cfg(test)]
impl QueuedRows {
    /// `tokens` f32 rows of no request in particular (their bytes are not read), queued now, whose
    /// answer no one awaits, as a step's tests need them.
    pub(crate) fn unread(tokens: usize) -> (Self, std::time::Duration) {
        let (reply, _) = oneshot::channel();
        let rows = Self {
            dtype: WireDtype::F32,
            output_dtype: WireDtype::F32,
            tokens,
            rows: RowsSource::Own(Bytes::new()),
            enqueued_at: Instant::now(),
            reply,
            request_id: 1,
            request_span: tracing::Span::none(),
        };
        (rows, std::time::Duration::ZERO)
    }
}

/// The answer for one [`QueuedRows`].
#[derive(Debug)]
pub struct RowsOut {
    pub dtype: WireDtype,
    pub tokens: usize,
    /// The rows' outputs; empty for a token-major part, whose outputs went into the sum.
    pub data: Bytes,
    /// A token-major request's per-token sum, on the part that completed it.
    pub combined: Option<Bytes>,
    pub queue_wait: Duration,
    pub compute: Duration,
    pub batch_tokens: usize,
}

/// Counters of one expert queue, for stats and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueCounters {
    pub admitted_tokens: u64,
    pub rejected_tokens: u64,
    pub batches: u64,
}

#[derive(Debug)]
pub struct ExpertQueue {
    d_model: usize,
    limit_tokens: usize,
    queued_tokens: usize,
    entries: VecDeque<QueuedRows>,
    counters: QueueCounters,
}

impl ExpertQueue {
    fn new(d_model: usize, limit_tokens: usize) -> Self {
        Self { d_model, limit_tokens, queued_tokens: 0, entries: VecDeque::new(), counters: QueueCounters::default() }
    }

    /// Drops rows whose caller went away (its request was cancelled): no compute is spent on them.
    fn drop_abandoned(&mut self) {
        let before = self.entries.len();
        self.entries.retain(|entry| !entry.reply.is_closed());
        if self.entries.len() != before {
            self.queued_tokens = self.entries.iter().map(|entry| entry.tokens).sum();
        }
    }
}

/// Rows of one expert taken together for one forward.
#[derive(Debug)]
pub struct Batch {
    pub expert: ExpertId,
    pub d_model: usize,
    pub entries: Vec<(QueuedRows, Duration)>,
}

impl Batch {
    pub fn tokens(&self) -> usize {
        self.entries.iter().map(|(entry, _)| entry.tokens).sum()
    }

    /// The ids of the requests whose rows this batch merges, comma-separated when shown.
    pub fn request_ids(&self) -> RequestIds<'_> {
        RequestIds(&self.entries)
    }
}

/// [`Batch::request_ids`]: written only when a span records it.
pub struct RequestIds<'a>(&'a [(QueuedRows, Duration)]);

impl std::fmt::Display for RequestIds<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (position, (entry, _)) in self.0.iter().enumerate() {
            if position > 0 {
                formatter.write_str(",")?;
            }
            write!(formatter, "{}", entry.request_id)?;
        }
        Ok(())
    }
}

/// Work that changes which experts are resident; runs on the compute thread, in order with batches.
#[derive(Debug)]
pub enum Command {
    /// Make these experts resident and open their queues, each with its token limit.
    Install { experts: Vec<(ExpertId, Expert, usize)>, done: oneshot::Sender<()> },
    /// Close these queues, serve what they hold, then free the experts.
    Remove { experts: Vec<ExpertId>, done: oneshot::Sender<Vec<ExpertId>> },
}

/// What the compute thread does next.
#[derive(Debug)]
pub enum Work {
    Command(Command),
    /// One batch per expert, computed together.
    Step(Vec<Batch>),
    Stop,
}

/// What [`next_step`] decided.
#[derive(Debug)]
pub enum Decision {
    /// One batch per expert with queued rows, the expert whose rows waited longest first.
    Run(Vec<Batch>),
    /// Nothing is due before this instant.
    WaitUntil(Instant),
    Idle,
}

/// A step is due when the expert whose oldest rows waited longest passed its wait bound or holds a
/// full batch, or at once when no request is `arriving` (waiting could merge nothing that is on its
/// way: a lone caller never pays the bound). Then every expert with queued rows joins the step (a
/// request's rows for its top-k experts arrive together, and a GPU runs them back to back without
/// waiting on the host between them), each taking whole requests, oldest first, up to
/// `max_batch_tokens` (at least one).
pub fn next_step(
    queues: &mut HashMap<ExpertId, ExpertQueue>,
    now: Instant,
    config: BatchingConfig,
    arriving: bool,
) -> Decision {
    for queue in queues.values_mut() {
        queue.drop_abandoned();
    }
    let mut heads: Vec<(ExpertId, Instant)> =
        queues.iter().filter_map(|(key, queue)| queue.entries.front().map(|head| (*key, head.enqueued_at))).collect();
    heads.sort_by_key(|(key, enqueued_at)| (*enqueued_at, key.layer, key.expert));
    let Some((oldest, head_enqueued_at)) = heads.first().copied() else {
        return Decision::Idle;
    };
    let due = head_enqueued_at + config.batch_wait;
    if arriving && now < due && queues[&oldest].queued_tokens < config.max_batch_tokens {
        return Decision::WaitUntil(due);
    }
    let batches = heads
        .into_iter()
        .map(|(expert, _)| {
            let queue = queues.get_mut(&expert).expect("every head belongs to a queue");
            take_batch(expert, queue, now, config.max_batch_tokens)
        })
        .collect();
    Decision::Run(batches)
}

/// Whole requests from the front of `queue`, up to `max_batch_tokens` (at least one).
fn take_batch(expert: ExpertId, queue: &mut ExpertQueue, now: Instant, max_batch_tokens: usize) -> Batch {
    let mut entries = Vec::new();
    let mut taken_tokens = 0;
    while let Some(head) = queue.entries.front() {
        if taken_tokens > 0 && taken_tokens + head.tokens > max_batch_tokens {
            break;
        }
        let entry = queue.entries.pop_front().expect("front exists");
        taken_tokens += entry.tokens;
        let waited = now.saturating_duration_since(entry.enqueued_at);
        entries.push((entry, waited));
    }
    queue.queued_tokens -= taken_tokens;
    queue.counters.batches += 1;
    Batch { expert, d_model: queue.d_model, entries }
}

#[derive(Debug, Default)]
struct SchedulerState {
    queues: HashMap<ExpertId, ExpertQueue>,
    commands: VecDeque<Command>,
    stopping: bool,
    /// Requests announced and not yet admitted ([`Arrival`]).
    arriving: usize,
}

/// A request on its way in: announced when its headers arrive, gone once its rows are admitted or
/// it fails before that. While any is on its way, queued rows wait for it up to the batch wait
/// bound; with none, a step starts at once.
#[derive(Debug)]
#[must_use = "the request counts as arriving until this is dropped"]
pub struct Arrival(Arc<Scheduler>);

impl Drop for Arrival {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.arriving -= 1;
        let none_left = state.arriving == 0;
        drop(state);
        if none_left {
            // Rows waiting for this request can go now.
            self.0.wake.notify_one();
        }
    }
}

/// A snapshot of one queue.
#[derive(Debug, Clone)]
pub struct QueueSnapshot {
    pub expert: ExpertId,
    pub d_model: usize,
    pub queued_tokens: usize,
    pub limit_tokens: usize,
    pub counters: QueueCounters,
}

/// The queues, shared by the async request handlers (admission) and the compute thread (batches).
#[derive(Debug)]
pub struct Scheduler {
    state: Mutex<SchedulerState>,
    wake: Condvar,
    config: BatchingConfig,
}

/// Receivers of one admitted request, one per part, in request order.
pub type Admitted = Vec<oneshot::Receiver<Result<RowsOut, WorkerError>>>;

impl Scheduler {
    pub fn new(config: BatchingConfig) -> Self {
        Self { state: Mutex::new(SchedulerState::default()), wake: Condvar::new(), config }
    }

    fn lock(&self) -> MutexGuard<'_, SchedulerState> {
        // A panic while holding this lock leaves only counters and queues, still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits every part of `batch` or none of them.
    pub fn admit(&self, batch: ForwardBatch) -> Result<Admitted, WorkerError> {
        let now = Instant::now();
        let request_span = tracing::Span::current();
        let mut state = self.lock();
        if state.stopping {
            return Err(WorkerError::Unavailable("the worker is shutting down".into()));
        }
        let mut requested: HashMap<ExpertId, usize> = HashMap::new();
        for part in &batch.parts {
            let Some(queue) = state.queues.get(&part.expert) else {
                return Err(WorkerError::invalid(
                    format!("{}.expert", part.field()),
                    format!("{} is not served by this worker", part.expert),
                ));
            };
            if part.width != queue.d_model {
                return Err(WorkerError::invalid(
                    format!("{}.rows.shape", part.field()),
                    format!(
                        "expected [{}, {}] (d_model {}), got width {}",
                        part.tokens, queue.d_model, queue.d_model, part.width
                    ),
                ));
            }
            let asked = requested.entry(part.expert).or_default();
            *asked += part.tokens;
            if queue.queued_tokens + *asked > queue.limit_tokens {
                let (queued, limit, asked) = (queue.queued_tokens, queue.limit_tokens, *asked);
                let rejected: usize = batch.parts.iter().filter(|p| p.expert == part.expert).map(|p| p.tokens).sum();
                if let Some(queue) = state.queues.get_mut(&part.expert) {
                    queue.counters.rejected_tokens += rejected as u64;
                }
                return Err(WorkerError::QueueFull {
                    field: part.field(),
                    expert: part.expert,
                    queued,
                    limit,
                    requested: asked,
                });
            }
        }
        let mut receivers = Vec::with_capacity(batch.parts.len());
        for part in batch.parts {
            let (reply, receiver) = oneshot::channel();
            receivers.push(receiver);
            let output_dtype = batch.output_dtype.unwrap_or(part.dtype.answer_dtype());
            if part.tokens == 0 {
                let _ = reply.send(Ok(RowsOut {
                    dtype: output_dtype,
                    tokens: 0,
                    data: Bytes::new(),
                    combined: None,
                    queue_wait: Duration::ZERO,
                    compute: Duration::ZERO,
                    batch_tokens: 0,
                }));
                continue;
            }
            let queue = state.queues.get_mut(&part.expert).expect("checked above");
            queue.queued_tokens += part.tokens;
            queue.counters.admitted_tokens += part.tokens as u64;
            queue.entries.push_back(QueuedRows {
                dtype: part.dtype,
                output_dtype,
                tokens: part.tokens,
                rows: part.rows,
                enqueued_at: now,
                reply,
                request_id: batch.request_id,
                request_span: request_span.clone(),
            });
        }
        drop(state);
        self.wake.notify_one();
        Ok(receivers)
    }

    /// Counts a request as on its way in until the returned [`Arrival`] is dropped.
    pub fn announce(self: &Arc<Self>) -> Arrival {
        self.lock().arriving += 1;
        Arrival(self.clone())
    }

    /// Queues `command` for the compute thread.
    pub fn submit(&self, command: Command) {
        self.lock().commands.push_back(command);
        self.wake.notify_one();
    }

    /// Opens (or resizes) the queue of a newly resident expert. Called by the compute thread.
    pub fn open_queue(&self, expert: ExpertId, d_model: usize, limit_tokens: usize) {
        let mut state = self.lock();
        let queue = state.queues.entry(expert).or_insert_with(|| ExpertQueue::new(d_model, limit_tokens));
        queue.d_model = d_model;
        queue.limit_tokens = limit_tokens;
    }

    /// Closes a queue to new requests and hands back the rows it still holds.
    pub fn close_queue(&self, expert: &ExpertId) -> Option<Vec<QueuedRows>> {
        let queue = self.lock().queues.remove(expert)?;
        Some(queue.entries.into())
    }

    /// Refuses new requests; the compute thread serves what is queued, then stops.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.wake.notify_all();
    }

    /// Blocks the compute thread until there is work.
    pub fn next_work(&self) -> Work {
        let mut state = self.lock();
        loop {
            if let Some(command) = state.commands.pop_front() {
                return Work::Command(command);
            }
            let config =
                if state.stopping { BatchingConfig { batch_wait: Duration::ZERO, ..self.config } } else { self.config };
            let arriving = state.arriving > 0;
            match next_step(&mut state.queues, Instant::now(), config, arriving) {
                Decision::Run(batches) => return Work::Step(batches),
                Decision::Idle if state.stopping => return Work::Stop,
                Decision::Idle => {
                    state = self.wake.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                Decision::WaitUntil(due) => {
                    let timeout = due.saturating_duration_since(Instant::now());
                    state = self.wake.wait_timeout(state, timeout).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
                }
            }
        }
    }

    pub fn snapshot(&self) -> Vec<QueueSnapshot> {
        let state = self.lock();
        let mut snapshot: Vec<_> = state
            .queues
            .iter()
            .map(|(expert, queue)| QueueSnapshot {
                expert: *expert,
                d_model: queue.d_model,
                queued_tokens: queue.queued_tokens,
                limit_tokens: queue.limit_tokens,
                counters: queue.counters,
            })
            .collect();
        snapshot.sort_by_key(|queue| (queue.expert.layer, queue.expert.expert));
        snapshot
    }

    pub fn queued_tokens(&self) -> usize {
        self.lock().queues.values().map(|queue| queue.queued_tokens).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::request::ExpertRowsIn;

    const CONFIG: BatchingConfig = BatchingConfig { batch_wait: Duration::from_millis(5), max_batch_tokens: 8 };

    fn rows(index: usize, expert: u32, tokens: usize, width: usize) -> ExpertRowsIn {
        ExpertRowsIn {
            index,
            expert: ExpertId::new(0, expert),
            dtype: WireDtype::F32,
            tokens,
            width,
            rows: RowsSource::Own(Bytes::from(vec![0u8; tokens * width * 4])),
        }
    }

    fn request(parts: Vec<ExpertRowsIn>) -> ForwardBatch {
        ForwardBatch { request_id: 7, parts, output_dtype: None, token_major: None }
    }

    fn scheduler_with(limits: &[(u32, usize)]) -> Scheduler {
        let scheduler = Scheduler::new(CONFIG);
        for (expert, limit) in limits {
            scheduler.open_queue(ExpertId::new(0, *expert), 4, *limit);
        }
        scheduler
    }

    /// The compute thread's next work, asked on a thread of its own: the thread, and where the
    /// work comes out (a test that waits on it bounds the wait, so a hang fails rather than stalls).
    fn next_work_on_a_thread(scheduler: &Arc<Scheduler>) -> (std::thread::JoinHandle<()>, mpsc::Receiver<Work>) {
        let (work, next) = mpsc::channel();
        let scheduler = scheduler.clone();
        let compute = std::thread::spawn(move || {
            let _ = work.send(scheduler.next_work());
        });
        (compute, next)
    }

    #[test]
    fn admission_is_all_or_nothing() {
        let scheduler = scheduler_with(&[(0, 10), (1, 4)]);
        let _kept = scheduler.admit(request(vec![rows(0, 0, 6, 4), rows(1, 1, 3, 4)])).expect("fits");
        let error = scheduler.admit(request(vec![rows(0, 0, 2, 4), rows(1, 1, 2, 4)])).unwrap_err();
        assert_eq!(
            error,
            WorkerError::QueueFull {
                field: "batches[1]".into(),
                expert: ExpertId::new(0, 1),
                queued: 3,
                limit: 4,
                requested: 2
            }
        );
        let snapshot = scheduler.snapshot();
        assert_eq!(snapshot[0].queued_tokens, 6, "expert 0 untouched by the refused request");
        assert_eq!(snapshot[1].queued_tokens, 3);
        assert_eq!(snapshot[1].counters.rejected_tokens, 2);
        assert_eq!(scheduler.queued_tokens(), 9);
    }

    #[test]
    fn a_queue_fills_to_exactly_its_limit() {
        let scheduler = scheduler_with(&[(0, 4)]);
        let _kept = scheduler.admit(request(vec![rows(0, 0, 3, 4)])).expect("fits");
        let _last = scheduler.admit(request(vec![rows(0, 0, 1, 4)])).expect("the limit's last token fits");
        let error = scheduler.admit(request(vec![rows(0, 0, 1, 4)])).unwrap_err();
        assert!(matches!(error, WorkerError::QueueFull { queued: 4, limit: 4, requested: 1, .. }), "{error:?}");
    }

    #[test]
    fn one_request_larger_than_the_limit_is_refused_on_an_empty_queue() {
        let scheduler = scheduler_with(&[(0, 4)]);
        let error = scheduler.admit(request(vec![rows(0, 0, 3, 4), rows(1, 0, 2, 4)])).unwrap_err();
        assert!(matches!(error, WorkerError::QueueFull { requested: 5, limit: 4, .. }), "{error:?}");
    }

    #[test]
    fn unknown_expert_and_wrong_width_name_the_field() {
        let scheduler = scheduler_with(&[(0, 10)]);
        let error = scheduler.admit(request(vec![rows(0, 0, 1, 4), rows(1, 9, 1, 4)])).unwrap_err();
        assert_eq!(error.to_string(), "batches[1].expert: layer 0 expert 9 is not served by this worker");
        let error = scheduler.admit(request(vec![rows(0, 0, 2, 5)])).unwrap_err();
        assert_eq!(error.to_string(), "batches[0].rows.shape: expected [2, 4] (d_model 4), got width 5");
        assert_eq!(scheduler.queued_tokens(), 0);
    }

    #[test]
    fn waits_for_the_bound_then_merges_requests_of_one_expert() {
        let scheduler = scheduler_with(&[(0, 100), (1, 100)]);
        let _a = scheduler.admit(request(vec![rows(0, 0, 2, 4)])).expect("fits");
        let _b = scheduler.admit(request(vec![rows(0, 1, 1, 4), rows(1, 0, 3, 4)])).expect("fits");
        let mut state = scheduler.lock();
        let start = state.queues[&ExpertId::new(0, 0)].entries[0].enqueued_at;
        assert!(
            matches!(next_step(&mut state.queues, start, CONFIG, true), Decision::WaitUntil(due) if due == start + CONFIG.batch_wait)
        );
        let Decision::Run(batches) = next_step(&mut state.queues, start + CONFIG.batch_wait, CONFIG, true) else {
            panic!("due after the wait bound");
        };
        let merged = &batches[0];
        assert_eq!((merged.expert, merged.tokens(), merged.entries.len()), (ExpertId::new(0, 0), 5, 2));
        assert_eq!(state.queues[&ExpertId::new(0, 0)].queued_tokens, 0);
        let other = &batches[1];
        assert_eq!((batches.len(), other.expert, other.tokens()), (2, ExpertId::new(0, 1), 1), "in the same step");
    }

    #[test]
    fn with_no_request_on_its_way_queued_rows_run_at_once() {
        let scheduler = scheduler_with(&[(0, 100)]);
        let _a = scheduler.admit(request(vec![rows(0, 0, 2, 4)])).expect("fits");
        let mut state = scheduler.lock();
        let start = state.queues[&ExpertId::new(0, 0)].entries[0].enqueued_at;
        let Decision::Run(batches) = next_step(&mut state.queues, start, CONFIG, false) else {
            panic!("nothing arriving to wait for");
        };
        assert_eq!(batches[0].tokens(), 2);
    }

    /// Expert 0's queue of 100 tokens, whose rows wait ten minutes for more while a request is on
    /// its way: long past any test, so that a step which comes shows something other than the bound.
    fn patient_scheduler() -> Arc<Scheduler> {
        let scheduler = Arc::new(Scheduler::new(BatchingConfig { batch_wait: Duration::from_secs(600), ..CONFIG }));
        scheduler.open_queue(ExpertId::new(0, 0), 4, 100);
        scheduler
    }

    /// Queued rows with a request on its way and a ten-minute wait bound: they wait while it is,
    /// and the step comes as soon as it ends, admitted (`admitted_tokens`) or failed (`None`).
    fn rows_waiting_for_an_arrival(admitted_tokens: Option<usize>) -> Vec<Batch> {
        let scheduler = patient_scheduler();
        let arriving = scheduler.announce();
        let first = scheduler.admit(request(vec![rows(0, 0, 2, 4)])).expect("fits");
        let (compute, next) = next_work_on_a_thread(&scheduler);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!compute.is_finished(), "the first request's rows wait for the one arriving");
        let second = admitted_tokens.map(|tokens| scheduler.admit(request(vec![rows(0, 0, tokens, 4)])).expect("fits"));
        drop(arriving);
        let Ok(Work::Step(batches)) = next.recv_timeout(Duration::from_secs(60)) else {
            panic!("a step once nothing is on its way, long before the ten minutes' bound")
        };
        drop((first, second));
        batches
    }

    #[test]
    fn rows_wait_while_a_request_arrives_and_go_when_it_is_admitted() {
        let batches = rows_waiting_for_an_arrival(Some(3));
        assert_eq!((batches[0].tokens(), batches[0].entries.len()), (5, 2), "both requests in one forward");
    }

    /// A request that fails on its way in (dropped before admission) lets the rows waiting for it
    /// go at once, not at the wait bound.
    #[test]
    fn rows_waiting_for_a_request_that_fails_on_its_way_go_at_once() {
        assert_eq!(rows_waiting_for_an_arrival(None)[0].tokens(), 2);
    }

    #[test]
    fn a_full_batch_runs_at_once_and_never_splits_a_request() {
        let scheduler = scheduler_with(&[(0, 100)]);
        let _receivers: Vec<_> = [5, 2, 3]
            .into_iter()
            .map(|tokens| scheduler.admit(request(vec![rows(0, 0, tokens, 4)])).expect("fits"))
            .collect();
        let mut state = scheduler.lock();
        let Decision::Run(batches) = next_step(&mut state.queues, Instant::now(), CONFIG, true) else {
            panic!("10 queued tokens >= max_batch_tokens 8 runs without waiting");
        };
        assert_eq!(batches[0].tokens(), 7, "5 + 2 fit in 8, the 3-token request waits");
        assert_eq!(state.queues[&ExpertId::new(0, 0)].queued_tokens, 3);
    }

    /// Exactly `max_batch_tokens` queued is a full batch: it runs without waiting, in one forward;
    /// a request larger than a batch runs alone rather than never.
    #[test]
    fn a_batch_fills_to_exactly_its_bound_and_a_larger_request_runs_alone() {
        let scheduler = scheduler_with(&[(0, 100), (1, 100)]);
        let _receivers: Vec<_> = [(0, 5), (0, 3), (1, 12), (1, 1)]
            .into_iter()
            .map(|(expert, tokens)| scheduler.admit(request(vec![rows(0, expert, tokens, 4)])).expect("fits"))
            .collect();
        let mut state = scheduler.lock();
        let start = state.queues[&ExpertId::new(0, 0)].entries[0].enqueued_at;
        let Decision::Run(batches) = next_step(&mut state.queues, start, CONFIG, true) else {
            panic!("8 queued tokens of expert 0 are a full batch");
        };
        let taken: Vec<_> = batches.iter().map(|batch| (batch.expert.expert, batch.tokens())).collect();
        assert_eq!(taken, [(0, 8), (1, 12)]);
        drop(state);
        let batches: Vec<_> = scheduler.snapshot().iter().map(|queue| queue.counters.batches).collect();
        assert_eq!(batches, [1, 1]);
    }

    #[test]
    fn abandoned_rows_are_dropped_before_compute() {
        let scheduler = scheduler_with(&[(0, 100)]);
        let abandoned = scheduler.admit(request(vec![rows(0, 0, 4, 4)])).expect("fits");
        let _kept = scheduler.admit(request(vec![rows(0, 0, 1, 4)])).expect("fits");
        drop(abandoned);
        let mut state = scheduler.lock();
        let Decision::Run(batches) = next_step(&mut state.queues, Instant::now() + CONFIG.batch_wait, CONFIG, true)
        else {
            panic!("due");
        };
        assert_eq!(batches[0].tokens(), 1);
        assert_eq!(state.queues[&ExpertId::new(0, 0)].queued_tokens, 0, "the abandoned rows' room is free again");
    }

    #[test]
    fn a_stopping_scheduler_refuses_new_work_and_drains() {
        let scheduler = scheduler_with(&[(0, 100)]);
        let _kept = scheduler.admit(request(vec![rows(0, 0, 1, 4)])).expect("fits");
        scheduler.stop();
        assert!(matches!(scheduler.admit(request(vec![rows(0, 0, 1, 4)])), Err(WorkerError::Unavailable(_))));
        assert!(matches!(scheduler.next_work(), Work::Step(batches) if batches[0].tokens() == 1));
        assert!(matches!(scheduler.next_work(), Work::Stop));
    }

    /// Stopping, queued rows no longer wait for a request on its way: it will be refused.
    #[test]
    fn a_stopping_scheduler_drains_without_waiting_for_arrivals() {
        let scheduler = patient_scheduler();
        let _arriving = scheduler.announce();
        let _kept = scheduler.admit(request(vec![rows(0, 0, 1, 4)])).expect("fits");
        scheduler.stop();
        let (_compute, next) = next_work_on_a_thread(&scheduler);
        let step = next.recv_timeout(Duration::from_secs(60));
        assert!(
            matches!(step, Ok(Work::Step(batches)) if batches[0].tokens() == 1),
            "long before the ten minutes' bound"
        );
    }
}
