//! [`MoeClient`]: one MoE layer call, distributed, as plan → exchange → combine. Gate and route
//! here and pack each worker's rows ([`crate::dispatch`]); send them all at once over the transport
//! and combine each answer as it arrives ([`crate::exchange`]); say where the time and bytes went.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use prost::Message;
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::{ExpertId, RequestId, TableVersion};
use switchyard_proto::v1;
use switchyard_proto::wire::WireDtype;
use tracing::Instrument;

use crate::codec::{add_rows, decode_rows};
use crate::cpu::CpuPool;
use crate::dispatch::{
    CallRows, DispatchLayout, Piece, PlannedRequest, TokenPlan, by_worker, carried_choices, in_group_order, le_words,
    pack_pieces, pack_token_choices, pack_token_rows, place, reroute,
};
use crate::error::ClientError;
use crate::exchange::{self, DestinationOutcome, Outcome};
use crate::gate::Gate;
use crate::gate_cache::LoadOnce;
use crate::hidden::Hidden;
use crate::ledger::{WorkerCall, response_compute};
use crate::lock;
use crate::metrics::ClientMetrics;
use crate::refusal::{TokenExperts, move_to_next_best};
use crate::replicas::{Choice, Replicas};
use crate::router::{
    ExpertAssignments, Routed, RoutingOverrides, RoutingSummary, assign, check_call, config_for_call, gate_and_route,
};
use crate::table::{RoutingTableView, TableReceiver};
use crate::throttle::{Throttle, Verdict};
use crate::timing::{ByteCounts, GRPC_FRAME_PREFIX, TimeBreakdown};
use crate::transport::{Answer, Endpoint, ExpertTransport, GrpcTransport};

/// How this client calls layers.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Element type of rows on the wire (both ways).
    pub wire_dtype: WireDtype,
    /// Deadline of one worker request.
    pub timeout: Duration,
    /// A worker's payload above this many bytes is split over several requests.
    pub split_request_bytes: usize,
    /// Changes to the model's routing (policy, overflow, capacity factor).
    pub routing: RoutingOverrides,
    /// Threads of the pool the client's CPU work (gate, packing, decode, combine) runs on.
    pub cpu_threads: usize,
    /// How rows travel: token-major (each token once per worker) unless asked otherwise.
    pub dispatch: DispatchLayout,
    /// HTTP/2 connections to each worker; a large payload is spread over them (one stream tops
    /// out well below what the socket carries).
    pub connections_per_worker: usize,
    /// Whether a large payload to one worker goes as a stream of chunks the worker starts on as
    /// they arrive (`dispatch::CHUNK_BYTES` each), or each stripe as one request. Off by default:
    /// on the 2-core development machine, where every transfer and every step compete for the same
    /// cores, DeepEP-normal dispatched in 71–74 ms whole against 88–93 ms chunked, and a compute-bound
    /// 4096-token call took the same time either way.
    pub chunked_dispatch: bool,
    /// The longest one attempt at a worker may take before its rows go to another holder of their
    /// experts; `None`: the whole deadline (`timeout`). Shorter lets a call route around a stalled
    /// worker when experts are replicated.
    pub attempt_timeout: Option<Duration>,
    /// What a full expert queue means when no other holder can take its rows.
    pub refusal: RefusalPolicy,
    /// Adaptive throttling ([`crate::throttle`]): requests a worker may be sent per request it
    /// accepted over the last 10 s before the client stops sending to it: its rows go to other
    /// holders of their experts, and rows with none fail the call with [`ClientError::Throttled`]
    /// (or, under the other refusal policies, overflow or move). `None`: never.
    pub throttle_ratio: Option<f64>,
}

/// What a worker's full expert queue means for a call when no other holder of the expert can take
/// the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RefusalPolicy {
    /// The call fails with the worker's `QueueFull` (its other requests are cancelled).
    #[default]
    Fail,
    /// The refused assignments overflow, as past an expert's capacity: those tokens keep only
    /// their residual path for that expert, and the call's routing counts them as `refused`.
    /// The worker that refused is given up for the call, so its other requests of the call
    /// (stripes of a large payload) are not waited for and count as refused too.
    Overflow,
    /// Each refused (token, expert) choice goes to the token's most probable expert it does not
    /// use yet, on a worker that has not refused in this call, weighted as the capacity's
    /// re-route policy weights a moved choice ([`crate::refusal`]); counted in the call's
    /// routing as `rerouted`. A choice with no such expert overflows (`refused`). Soft MoE's slot
    /// rows are no token's choices: they overflow.
    NextBest,
}

/// The Google SRE book's suggested `K`: a worker is sent twice what it accepts, so the client sees
/// at once when it has room again.
pub const DEFAULT_THROTTLE_RATIO: f64 = 2.0;

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            wire_dtype: WireDtype::F32,
            timeout: Duration::from_secs(30),
            split_request_bytes: switchyard_common::transport::SPLIT_REQUEST_BYTES,
            routing: RoutingOverrides::default(),
            cpu_threads: crate::cpu::default_threads(),
            dispatch: DispatchLayout::default(),
            connections_per_worker: crate::transport::default_connections(),
            chunked_dispatch: false,
            attempt_timeout: None,
            refusal: RefusalPolicy::Fail,
            throttle_ratio: Some(DEFAULT_THROTTLE_RATIO),
        }
    }
}

/// The answer of one layer call.
#[derive(Debug, Clone)]
pub struct LayerOutput {
    /// `[tokens, d_model]`: `Σ weight · expert(x)` over kept assignments.
    pub hidden: Vec<f32>,
    /// `[tokens, experts]`.
    pub router_logits: Vec<f32>,
    pub routing: RoutingSummary,
    pub timing: TimeBreakdown,
    pub bytes: ByteCounts,
    pub workers: Vec<WorkerCall>,
    pub table_version: TableVersion,
    /// Requests sent again to another holder after their worker failed (0 in a healthy cluster).
    pub retried_requests: usize,
}

/// Which gate: a layer of a synthetic model (by seed) or of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GateKey {
    layer: u32,
    seed: u64,
    checkpoint: Option<String>,
}

/// The distributed MoE layer. Cheap to share (`Arc`) between concurrent callers.
#[derive(Debug)]
pub struct MoeClient {
    tables: TableReceiver,
    options: ClientOptions,
    transport: Arc<dyn ExpertTransport>,
    metrics: ClientMetrics,
    gates: Arc<LoadOnce<GateKey, Gate>>,
    cpu: CpuPool,
    replicas: Replicas,
    throttle: Option<Arc<Throttle>>,
    next_request_id: AtomicU64,
}

impl MoeClient {
    /// A client reaching its workers over gRPC.
    pub fn new(tables: TableReceiver, options: ClientOptions) -> Self {
        let transport = Arc::new(GrpcTransport::new(options.connections_per_worker));
        Self::with_transport(tables, options, transport)
    }

    /// A client reaching its workers over `transport` (in-process for the reference layer, scripted
    /// in tests).
    pub fn with_transport(tables: TableReceiver, options: ClientOptions, transport: Arc<dyn ExpertTransport>) -> Self {
        // Request ids unique across client processes: pid in the high bits.
        let first_id = (u64::from(std::process::id()) << 32) | 1;
        // Fails only when the operating system cannot start a thread.
        let cpu = CpuPool::new(options.cpu_threads).expect("the client's CPU threads start");
        let throttle = options.throttle_ratio.map(|ratio| Arc::new(Throttle::new(ratio)));
        Self {
            tables,
            options,
            transport,
            metrics: ClientMetrics::default(),
            gates: Arc::default(),
            cpu,
            replicas: Replicas::default(),
            throttle,
            next_request_id: AtomicU64::new(first_id),
        }
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// The time-breakdown histograms and byte counters of every call so far, for `/metrics`.
    pub fn metrics(&self) -> &ClientMetrics {
        &self.metrics
    }

    /// Bytes each worker connection wrote and read on its socket so far: `(endpoint, sent, received)`.
    pub fn wire_bytes(&self) -> Vec<(Endpoint, u64, u64)> {
        self.transport.wire_bytes()
    }

    /// The table calls are routed with right now.
    pub fn table(&self) -> Option<Arc<RoutingTableView>> {
        self.tables.borrow().clone()
    }

    /// Runs `hidden` (`[tokens, d_model]`, row-major) through MoE layer `layer`.
    pub async fn forward(&self, layer: u32, hidden: impl Into<Hidden>) -> Result<LayerOutput, ClientError> {
        self.forward_with(layer, hidden, &self.options.routing).await
    }

    /// [`MoeClient::forward`] with `routing` instead of this client's routing overrides.
    pub async fn forward_with(
        &self,
        layer: u32,
        hidden: impl Into<Hidden>,
        routing: &RoutingOverrides,
    ) -> Result<LayerOutput, ClientError> {
        let request_id = RequestId(self.next_request_id.fetch_add(1, Ordering::Relaxed));
        let span = tracing::info_span!("layer_forward", request_id = request_id.0, layer);
        let output = self.forward_inner(request_id, layer, hidden.into(), routing).instrument(span).await;
        self.metrics.observe(&output);
        if output.is_err() {
            // A caller that retries failures at once must not starve the tasks that mend them
            // (the table watcher) on a runtime with few threads.
            tokio::task::yield_now().await;
        }
        output
    }

    async fn forward_inner(
        &self,
        request_id: RequestId,
        layer: u32,
        hidden: Hidden,
        routing: &RoutingOverrides,
    ) -> Result<LayerOutput, ClientError> {
        let started = Instant::now();
        let deadline = started + self.options.timeout;
        let table = self
            .table()
            .ok_or(ClientError::NoTable { coordinator: "(not connected)".into(), waited: Duration::ZERO })?;
        let values = hidden.len();
        let planning = Planning {
            request_id,
            table: table.clone(),
            layer,
            hidden,
            routing: *routing,
            gates: self.gates.clone(),
            cpu_threads: self.options.cpu_threads,
            dtype: self.options.wire_dtype,
            split_bytes: self.options.split_request_bytes,
            stripes: self.transport.connections_per_worker(),
            chunked: self.options.chunked_dispatch,
            dispatch: self.options.dispatch,
            choice: self.replicas.choice(request_id.0, HashSet::new()),
            throttle: self.throttle.clone(),
            refusal: self.options.refusal,
        };
        let handed_off = Instant::now();
        let (plan, first_round, mut timing) = self.cpu.run_sized(planning.work(), move || planning.plan()).await??;
        // Waiting for a pool thread and for this task to be woken is part of planning's cost.
        timing.plan += handed_off.elapsed().saturating_sub(timing.gate + timing.plan + timing.encode);
        let plan = Arc::new(plan);

        let mut collecting = Collecting::new(&plan, values);
        let mut rounds = Rounds {
            request_id,
            layer,
            deadline,
            table,
            excluded: HashSet::new(),
            retried_requests: 0,
            moves: plan.moves.clone(),
            refused: plan.throttled.clone(),
        };
        let mut round = Arc::new(first_round);
        loop {
            let finished = self.exchange_round(&plan, &round, &rounds, &mut collecting).await?;
            if finished.unanswered.is_empty() {
                break;
            }
            let next_round = self.next_round(&plan, &round, &finished, &mut rounds).await?;
            if next_round.is_empty() {
                break;
            }
            collecting.combine.add_requests(&next_round);
            round = Arc::new(next_round);
        }
        let last_answer = Instant::now();
        let (combine, sums) = collecting.summed(&self.cpu, values).await?;
        let mut output = combine.finish(plan, sums, rounds.table.version, timing, last_answer.elapsed(), started);
        output.retried_requests = rounds.retried_requests;
        rounds.settle(&mut output.routing);
        Ok(output)
    }

    /// Sends every request of `round` at once and collects each answer as it arrives. A worker
    /// failing in a way worth retrying is given up (its requests come back as unanswered); any
    /// other failure ends the call.
    async fn exchange_round(
        &self,
        plan: &Arc<CallPlan>,
        round: &Arc<Vec<PlannedRequest>>,
        rounds: &Rounds,
        collecting: &mut Collecting,
    ) -> Result<exchange::Round, ClientError> {
        let left = rounds.deadline.saturating_duration_since(Instant::now());
        let attempt = self.options.attempt_timeout.map_or(left, |attempt| attempt.min(left));
        // A full queue with no other holder is not the call's end under these policies.
        let refusals_tolerated = self.options.refusal != RefusalPolicy::Fail;
        let exchanged = exchange::run(
            &*self.transport,
            &self.replicas,
            round,
            attempt,
            |error| {
                Retry::of(error).worth_it(error, &rounds.table, rounds.layer)
                    || (refusals_tolerated && matches!(error, ClientError::QueueFull { .. }))
            },
            |index, answer| collecting.accept(&self.cpu, plan, round, index, answer),
        )
        .await;
        self.count_verdicts(match &exchanged {
            Ok(finished) => &finished.outcomes,
            Err(failure) => &failure.outcomes,
        });
        exchanged.map_err(|failure| {
            let outcomes: Vec<String> = failure
                .outcomes
                .iter()
                .map(|destination| {
                    let state = match destination.outcome {
                        Outcome::Answered => "answered",
                        Outcome::Failed(_) => "failed",
                        Outcome::Abandoned => "abandoned",
                    };
                    format!("{}: {state}", destination.endpoint)
                })
                .collect();
            tracing::debug!(error = %failure.error, ?outcomes, "layer call failed");
            failure.error
        })
    }

    /// The requests of the round after `finished`: what its failed workers left unanswered, sent
    /// to other holders of their experts (waiting, within the deadline, for a table that moves the
    /// experts of a worker that is gone); rows a full queue refused are moved to the next best
    /// expert or overflow, as the refusal policy says. Empty when nothing is left to send.
    async fn next_round(
        &self,
        plan: &Arc<CallPlan>,
        round: &[PlannedRequest],
        finished: &exchange::Round,
        rounds: &mut Rounds,
    ) -> Result<Vec<PlannedRequest>, ClientError> {
        let mut worst = Retry::OtherHolder;
        let mut first_error = None;
        for (endpoint, error) in finished.failures() {
            tracing::debug!(%endpoint, %error, "worker failed; sending its rows to another holder");
            rounds.excluded.insert(endpoint.clone());
            // A full queue is one expert's, on a worker that answered: later calls still use the
            // worker (spreading by assignments in flight and the throttle pace it); one that
            // failed or stalled is avoided for a while.
            if !matches!(error, ClientError::QueueFull { .. }) {
                self.replicas.suspect(endpoint);
            }
            worst = worst.max(Retry::of(error));
            first_error.get_or_insert_with(|| error.clone());
        }
        let first_error = first_error.expect("unanswered requests come from a failed worker");
        let error_at =
            |endpoint: &Endpoint| finished.failures().find(|(failed, _)| *failed == endpoint).map(|(_, e)| e);
        let refusals_tolerated = self.options.refusal != RefusalPolicy::Fail;
        // A refused request goes to other holders only when each of its experts has one this call
        // has not given up on; else the refusal policy takes all its rows, as with one holder.
        let another_holder_for_each = |planned: &PlannedRequest| {
            assignments_of(planned, &plan.routed).iter().all(|(expert, _)| {
                rounds.table.endpoints(rounds.layer, *expert).iter().any(|holder| !rounds.excluded.contains(holder))
            })
        };
        let (refused_here, failed): (Vec<usize>, Vec<usize>) = finished.unanswered.iter().partition(|&&index| {
            refusals_tolerated
                && error_at(&round[index].endpoint).is_some_and(|error| matches!(error, ClientError::QueueFull { .. }))
                && !another_holder_for_each(&round[index])
        });
        let mut next_round = Vec::new();
        if self.options.refusal == RefusalPolicy::NextBest && !refused_here.is_empty() {
            let refused_requests: Vec<PlannedRequest> =
                refused_here.iter().map(|&index| round[index].clone()).collect();
            let mut choice = self.replicas.choice(rounds.request_id.0, rounds.excluded.clone());
            let (plan, moved_on) = (plan.clone(), rounds.table.clone());
            let moved = self.cpu.run(move || plan.move_refused(&refused_requests, &moved_on, &mut choice)).await?;
            rounds.moves.extend(moved.moves);
            rounds.refused.extend(moved.overflowed);
            next_round.extend(moved.requests);
        } else {
            for index in refused_here {
                rounds.refused.extend(assignments_of(&round[index], &plan.routed));
            }
        }
        if !failed.is_empty() {
            let failed: Vec<PlannedRequest> = failed.iter().map(|&index| round[index].clone()).collect();
            rounds.retried_requests += failed.len();
            let failed = Arc::new(failed);
            let requests = loop {
                let mut choice = self.replicas.choice(rounds.request_id.0, rounds.excluded.clone());
                let (plan, failed, rerouted_on) = (plan.clone(), failed.clone(), rounds.table.clone());
                let rerouted = self
                    .cpu
                    .run(move || {
                        let failed: Vec<&PlannedRequest> = failed.iter().collect();
                        reroute(&failed, &plan.routed.groups, &rerouted_on, &mut choice, plan.call_rows())
                    })
                    .await?;
                match rerouted {
                    Ok(requests) => break requests,
                    // No holder left: a worker that is gone comes back in a table that moves
                    // its experts; wait for that within the deadline. A full queue or a
                    // stalled worker with no other holder fails the call now, as it would
                    // have without replicas.
                    Err(ClientError::Unplaced { .. }) if worst == Retry::OtherHolderOrNewTable => {
                        rounds.table = self
                            .newer_table(&rounds.table, rounds.deadline)
                            .await
                            .ok_or_else(|| first_error.clone())?;
                        rounds.excluded.clear();
                    }
                    Err(ClientError::Unplaced { .. }) => return Err(first_error),
                    Err(error) => return Err(error),
                }
            };
            next_round.extend(requests);
        }
        for planned in &mut next_round {
            planned.request.request_id = rounds.request_id.0;
        }
        Ok(next_round)
    }

    /// Tells throttling which workers answered and which refused for want of room; a worker
    /// abandoned or failed otherwise says nothing about its load.
    fn count_verdicts(&self, outcomes: &[DestinationOutcome]) {
        let Some(throttle) = &self.throttle else { return };
        for destination in outcomes {
            let verdict = match &destination.outcome {
                Outcome::Answered => Verdict::Accepted,
                Outcome::Failed(error) if error.code() == tonic::Code::ResourceExhausted => Verdict::Refused,
                Outcome::Failed(_) | Outcome::Abandoned => continue,
            };
            throttle.record(&destination.endpoint, verdict);
        }
    }

    /// The first table that replaces `current`, if one comes before `deadline`.
    async fn newer_table(&self, current: &RoutingTableView, deadline: Instant) -> Option<Arc<RoutingTableView>> {
        let mut tables = self.tables.clone();
        let newer = tables.wait_for(|table| table.as_deref().is_some_and(|table| table.supersedes(Some(current))));
        let newer = tokio::time::timeout_at(deadline.into(), newer).await.ok()?.ok()?;
        newer.clone()
    }
}

/// Books `requests` in their workers' calls.
fn book_requests(worker_calls: &mut Vec<WorkerCall>, requests: &[PlannedRequest]) {
    for planned in requests {
        let worker_call = worker_call_of(worker_calls, &planned.endpoint);
        worker_call.requests += 1;
        worker_call.rows += planned.rows();
        worker_call.bytes.payload_sent += planned.payload_bytes();
        worker_call.bytes.message_sent += planned.request.encoded_len() as u64 + GRPC_FRAME_PREFIX;
    }
}

/// `endpoint`'s call among `worker_calls`, added if it has none yet.
fn worker_call_of<'a>(worker_calls: &'a mut Vec<WorkerCall>, endpoint: &Endpoint) -> &'a mut WorkerCall {
    match worker_calls.iter().position(|call| call.endpoint == *endpoint) {
        Some(index) => &mut worker_calls[index],
        None => {
            worker_calls.push(WorkerCall::new(endpoint.clone()));
            worker_calls.last_mut().expect("just pushed")
        }
    }
}

/// The (expert, assignments) `planned` carries.
fn assignments_of(planned: &PlannedRequest, routed: &Routed) -> Vec<(u32, usize)> {
    if let Some(tokens) = &planned.request.tokens {
        let mut counts: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
        for expert in le_words(&tokens.experts).map(u32::from_le_bytes) {
            *counts.entry(expert).or_default() += 1;
        }
        return counts.into_iter().collect();
    }
    planned.pieces.iter().map(|piece| (routed.groups[piece.group].expert, piece.end - piece.start)).collect()
}

/// What a worker's failure allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Retry {
    /// The call fails: the request or the answer was wrong, and would be anywhere.
    Never,
    /// Another holder of the experts may take the rows (a full queue, a stalled worker).
    OtherHolder,
    /// The worker is gone: another holder, or the table that moves its experts elsewhere.
    OtherHolderOrNewTable,
}

impl Retry {
    /// Whether to give the failed worker up and send its rows elsewhere, rather than end the
    /// call at once (which cancels its other requests at their workers before they compute):
    /// always for a worker that is gone; for a full queue only when the expert has another
    /// holder; for a stalled worker only when some expert is replicated.
    fn worth_it(self, error: &ClientError, table: &RoutingTableView, layer: u32) -> bool {
        match (self, error) {
            (Retry::Never, _) => false,
            (Retry::OtherHolderOrNewTable, _) => true,
            (Retry::OtherHolder, ClientError::QueueFull { expert, .. }) => {
                table.endpoints(layer, expert.expert).len() > 1
            }
            (Retry::OtherHolder, _) => table.has_replicas(),
        }
    }

    fn of(error: &ClientError) -> Self {
        match error {
            ClientError::Worker { code, .. } => match code {
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Aborted => {
                    Retry::OtherHolderOrNewTable
                }
                tonic::Code::ResourceExhausted | tonic::Code::DeadlineExceeded => Retry::OtherHolder,
                _ => Retry::Never,
            },
            ClientError::BadEndpoint { .. } => Retry::OtherHolderOrNewTable,
            ClientError::QueueFull { .. } | ClientError::Timeout { .. } => Retry::OtherHolder,
            _ => Retry::Never,
        }
    }
}

/// Everything planning a call needs, owned, so that it runs on the CPU pool.
struct Planning {
    request_id: RequestId,
    table: Arc<RoutingTableView>,
    layer: u32,
    hidden: Hidden,
    routing: RoutingOverrides,
    gates: Arc<LoadOnce<GateKey, Gate>>,
    /// The client's CPU threads, which a large call's gate may use at once.
    cpu_threads: usize,
    dtype: WireDtype,
    split_bytes: usize,
    stripes: usize,
    chunked: bool,
    dispatch: DispatchLayout,
    choice: Choice,
    throttle: Option<Arc<Throttle>>,
    refusal: RefusalPolicy,
}

/// An answer's tensor bytes: the work of decoding and summing it, in [`CpuPool::run_sized`]'s
/// units (a byte counted as a value errs toward the pool).
fn answer_bytes(response: &v1::ForwardResponse) -> usize {
    let rows = response.outputs.iter().filter_map(|output| output.rows.as_ref());
    response.combined.iter().chain(rows).map(|tensor| tensor.data.len()).sum()
}

impl Planning {
    /// What identifies the layer's gate among those already in memory.
    fn gate_key(&self) -> GateKey {
        let model = &self.table.model;
        GateKey { layer: self.layer, seed: model.seed, checkpoint: model.checkpoint.clone() }
    }

    /// The gate of the layer: seeded for a synthetic model, read once from a checkpoint otherwise
    /// (the first call of a layer reads it; other layers' calls meanwhile do not wait for it).
    fn gate(&self) -> Result<Arc<Gate>, ClientError> {
        let model = &self.table.model;
        self.gates.get_or_load(&self.gate_key(), || match &model.checkpoint {
            None => Ok(Gate::synthetic(model, self.layer).with_threads(self.cpu_threads)),
            Some(dir) => Checkpoint::open(std::path::Path::new(dir))
                .and_then(|checkpoint| Gate::from_checkpoint(&checkpoint, self.layer))
                .map(|gate| gate.with_threads(self.cpu_threads))
                .map_err(|error| ClientError::Checkpoint { reason: error.to_string() }),
        })
    }

    /// About how much CPU work [`Planning::plan`] is, in [`CpuPool::run_sized`]'s units: the gate's
    /// multiply-adds over 8 and every value packed. Unbounded until the layer's gate is in memory
    /// (a checkpoint's is read from disk by the first call).
    fn work(&self) -> usize {
        let model = &self.table.model;
        if !self.gates.is_loaded(&self.gate_key()) {
            return usize::MAX;
        }
        let experts = (model.experts_per_layer + model.shared_experts) as usize;
        self.hidden.len().saturating_mul(1 + experts / 8)
    }

    /// Gate, route, group by worker, pack: the requests of one call, and the time each step took.
    fn plan(mut self) -> Result<(CallPlan, Vec<PlannedRequest>, TimeBreakdown), ClientError> {
        let mut timing = TimeBreakdown::default();
        let (table, layer, hidden) = (&*self.table, self.layer, &*self.hidden);
        let model = &table.model;
        let d_model = model.d_model as usize;
        check_call(model, layer, hidden)?;
        let tokens = hidden.len() / d_model;
        if table.max_batch_tokens > 0 && tokens > table.max_batch_tokens as usize {
            return Err(ClientError::InvalidInput {
                field: "hidden",
                reason: format!(
                    "{tokens} tokens exceed the cluster's largest batch, {} tokens (the coordinator's --max-batch-tokens): \
                     the expert queues are sized for it",
                    table.max_batch_tokens
                ),
            });
        }
        let config = config_for_call(model, &self.routing);
        config.check_call(tokens)?;

        let phase = Instant::now();
        let gate = self.gate()?;
        let (logits, routing) = gate_and_route(&gate, hidden, config);
        timing.gate = phase.elapsed();

        let phase = Instant::now();
        let routed = assign(&gate, hidden, logits, routing, config);
        let mut workers = by_worker(layer, &routed.groups, table, &mut self.choice)?;
        let held_back = match &self.throttle {
            Some(throttle) => hold_back_throttled(
                throttle,
                self.refusal,
                &routed.groups,
                table,
                layer,
                &mut self.choice,
                &mut workers,
            )?,
            None => Vec::new(),
        };
        timing.plan = phase.elapsed();

        let call = CallRows {
            layer,
            hidden,
            d_model,
            dtype: self.dtype,
            split_bytes: self.split_bytes,
            stripes: self.stripes,
            chunked: self.chunked,
            threads: self.cpu_threads,
        };
        let mut requests: Vec<PlannedRequest> = Vec::new();
        let mut worker_calls: Vec<WorkerCall> = Vec::with_capacity(workers.len());
        for (endpoint, pieces) in &workers {
            let phase = Instant::now();
            // Soft MoE's slot inputs are not token rows: they travel expert-major.
            let token_major = self.dispatch == DispatchLayout::TokenMajor
                && pieces.iter().all(|piece| routed.groups[piece.group].slots.is_none());
            let packed = if token_major {
                pack_token_rows(endpoint, pieces, &routed.groups, call)
            } else {
                pack_pieces(endpoint, pieces, &routed.groups, call)
            };
            book_requests(&mut worker_calls, &packed);
            let encode = phase.elapsed();
            worker_call_of(&mut worker_calls, endpoint).encode = encode;
            timing.encode += encode;
            requests.extend(packed);
        }
        let mut plan = CallPlan {
            layer,
            d_model,
            routed,
            hidden: self.hidden,
            dtype: self.dtype,
            split_bytes: self.split_bytes,
            stripes: self.stripes,
            chunked: self.chunked,
            cpu_threads: self.cpu_threads,
            worker_calls,
            throttled: Vec::new(),
            moves: Vec::new(),
            used: Mutex::new(TokenExperts::default()),
        };
        if !held_back.is_empty() {
            let phase = Instant::now();
            let moved = plan.place_held_back(&held_back, &workers, table, &mut self.choice, self.refusal);
            book_requests(&mut plan.worker_calls, &moved);
            requests.extend(moved);
            timing.encode += phase.elapsed();
        }
        for planned in &mut requests {
            planned.request.request_id = self.request_id.0;
        }
        Ok((plan, requests, timing))
    }
}

/// Asks throttling about each worker the call would send to. The rows of one it holds back go to
/// other holders of their experts, each asked in turn; rows left with no holder it admits fail
/// the call ([`ClientError::Throttled`]) before anything is packed, or under the other refusal
/// policies are returned, to be treated as refused.
fn hold_back_throttled(
    throttle: &Throttle,
    policy: RefusalPolicy,
    groups: &[ExpertAssignments],
    table: &RoutingTableView,
    layer: u32,
    choice: &mut Choice,
    workers: &mut BTreeMap<Endpoint, Vec<Piece>>,
) -> Result<Vec<Piece>, ClientError> {
    let mut first_refusal = None;
    let mut throttled: Vec<Endpoint> = Vec::new();
    let mut ask = |endpoint: &Endpoint, throttled: &mut Vec<Endpoint>| {
        if let Err(refused) = throttle.admit(endpoint) {
            first_refusal.get_or_insert_with(|| ClientError::Throttled {
                endpoint: endpoint.to_string(),
                requests: refused.requests,
                accepts: refused.accepts,
            });
            throttled.push(endpoint.clone());
        }
    };
    for endpoint in workers.keys() {
        ask(endpoint, &mut throttled);
    }
    if throttled.is_empty() {
        return Ok(Vec::new());
    }
    // Each worker is asked once (a refusal counts): those the moved rows reach are asked then.
    let mut asked: HashSet<Endpoint> = workers.keys().cloned().collect();
    let mut held_back = Vec::new();
    while !throttled.is_empty() {
        choice.excluded.extend(throttled.iter().cloned());
        for endpoint in std::mem::take(&mut throttled) {
            for piece in workers.remove(&endpoint).unwrap_or_default() {
                if !place(piece, groups, table, layer, choice, workers) {
                    held_back.push(piece);
                }
            }
        }
        for endpoint in workers.keys() {
            if !asked.contains(endpoint) {
                asked.insert(endpoint.clone());
                ask(endpoint, &mut throttled);
            }
        }
    }
    in_group_order(workers);
    match first_refusal {
        Some(refusal) if policy == RefusalPolicy::Fail && !held_back.is_empty() => Err(refusal),
        _ => Ok(held_back),
    }
}

/// One call's plan: the routing, what packing more requests needs, and each worker's share so far.
struct CallPlan {
    layer: u32,
    d_model: usize,
    routed: Routed,
    hidden: Hidden,
    dtype: WireDtype,
    split_bytes: usize,
    stripes: usize,
    chunked: bool,
    cpu_threads: usize,
    worker_calls: Vec<WorkerCall>,
    /// (expert, assignments) overflowed because throttling held their worker back.
    throttled: Vec<(u32, usize)>,
    /// (from, to) expert of each choice moved to its next best because throttling held its
    /// worker back ([`RefusalPolicy::NextBest`]).
    moves: Vec<(u32, u32)>,
    /// The experts each token uses, as choices move to their next best.
    used: Mutex<TokenExperts>,
}

/// Requests carrying refused choices to their tokens' next-best experts, and what moved.
struct NextBestRound {
    requests: Vec<PlannedRequest>,
    moves: Vec<(u32, u32)>,
    overflowed: Vec<(u32, usize)>,
}

impl CallPlan {
    /// The pieces throttling held back: overflowed, or under [`RefusalPolicy::NextBest`] moved
    /// to their tokens' next-best experts on the workers the call sends to anyway. Returns the
    /// requests to add.
    fn place_held_back(
        &mut self,
        held_back: &[Piece],
        sending_to: &BTreeMap<Endpoint, Vec<Piece>>,
        table: &RoutingTableView,
        choice: &mut Choice,
        policy: RefusalPolicy,
    ) -> Vec<PlannedRequest> {
        let mut carried = Vec::new();
        for piece in held_back {
            let group = &self.routed.groups[piece.group];
            if policy == RefusalPolicy::NextBest && group.slots.is_none() {
                let rows = group.tokens[piece.start..piece.end].iter().zip(&group.weights[piece.start..piece.end]);
                carried.extend(rows.map(|(token, weight)| (*token, group.expert, *weight)));
            } else {
                self.throttled.push((group.expert, piece.end - piece.start));
            }
        }
        if carried.is_empty() {
            return Vec::new();
        }
        let holders_of = |expert: u32| {
            let holders = table.endpoints(self.layer, expert).iter();
            holders.filter(|holder| sending_to.contains_key(*holder)).cloned().collect()
        };
        let used = self.used.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        let moved = move_to_next_best(&carried, &self.routed.routing, used, choice, holders_of);
        self.throttled.extend(moved.overflowed);
        self.moves = moved.moves;
        let call = self.call_rows();
        moved
            .by_endpoint
            .into_iter()
            .flat_map(|(endpoint, choices)| pack_token_choices(&endpoint, choices, call))
            .collect()
    }

    /// Requests carrying `refused`'s choices to their tokens' next-best experts, each on a holder
    /// `choice` allows (the workers that refused in this call are excluded).
    fn move_refused(&self, refused: &[PlannedRequest], table: &RoutingTableView, choice: &mut Choice) -> NextBestRound {
        let mut overflowed = Vec::new();
        let mut carried = Vec::new();
        for planned in refused {
            match carried_choices(planned, &self.routed.groups) {
                Some(choices) => carried.extend(choices),
                None => overflowed.extend(assignments_of(planned, &self.routed)),
            }
        }
        let holders_of = |expert: u32| table.endpoints(self.layer, expert).to_vec();
        let moved = move_to_next_best(&carried, &self.routed.routing, &mut lock(&self.used), choice, holders_of);
        overflowed.extend(moved.overflowed);
        let call = self.call_rows();
        let requests = moved
            .by_endpoint
            .into_iter()
            .flat_map(|(endpoint, choices)| pack_token_choices(&endpoint, choices, call))
            .collect();
        NextBestRound { requests, moves: moved.moves, overflowed }
    }

    fn call_rows(&self) -> CallRows<'_> {
        CallRows {
            layer: self.layer,
            hidden: &self.hidden,
            d_model: self.d_model,
            dtype: self.dtype,
            split_bytes: self.split_bytes,
            stripes: self.stripes,
            chunked: self.chunked,
            threads: self.cpu_threads,
        }
    }
}

/// A call's rounds: the first sends the plan's requests, each later one what failed workers left
/// unanswered, to other holders. What they change besides the answers is kept here.
struct Rounds {
    request_id: RequestId,
    layer: u32,
    deadline: Instant,
    /// The table the call routes by: a newer one once a worker is gone and its experts moved.
    table: Arc<RoutingTableView>,
    /// Workers given up on in this call.
    excluded: HashSet<Endpoint>,
    retried_requests: usize,
    /// (from, to) experts of the assignments a full queue refused and the next-best policy moved.
    moves: Vec<(u32, u32)>,
    /// (expert, assignments) a full queue refused, or throttling held back, and the refusal
    /// policy let overflow.
    refused: Vec<(u32, usize)>,
}

impl Rounds {
    /// Counts the refused assignments as such and the moved ones at the experts that took them.
    fn settle(self, routing: &mut RoutingSummary) {
        let kept = &mut routing.tokens_per_expert;
        for (expert, count) in self.refused {
            routing.refused += count;
            if let Some(kept) = kept.get_mut(expert as usize) {
                *kept = kept.saturating_sub(count as u32);
            }
        }
        for (from, to) in self.moves {
            routing.rerouted += 1;
            if let Some(kept) = kept.get_mut(from as usize) {
                *kept = kept.saturating_sub(1);
            }
            if let Some(kept) = kept.get_mut(to as usize) {
                *kept += 1;
            }
        }
    }
}

/// Where a call's answers go: each checked and booked on the async task as it arrives (a bad one
/// ends the call at once), then decoded and summed on the CPU pool while later answers are still
/// on the wire.
struct Collecting {
    combine: Combine,
    sums: Arc<Mutex<Sums>>,
    summing: Vec<BoxFuture<'static, Result<(), ClientError>>>,
}

impl Collecting {
    fn new(plan: &CallPlan, values: usize) -> Self {
        Self { combine: Combine::new(plan), sums: Arc::new(Mutex::new(Sums::new(values))), summing: Vec::new() }
    }

    /// Checks `answer` to `round[index]` and starts summing it on `cpu`.
    fn accept(
        &mut self,
        cpu: &CpuPool,
        plan: &Arc<CallPlan>,
        round: &Arc<Vec<PlannedRequest>>,
        index: usize,
        answer: Answer,
    ) -> Result<(), ClientError> {
        let response = self.combine.accept(plan, &round[index], answer)?;
        let (plan, round, sums) = (plan.clone(), round.clone(), self.sums.clone());
        let work = answer_bytes(&response);
        self.summing.push(cpu.spawn_sized(work, move || lock(&sums).add(&plan, &round[index], &response)).boxed());
        Ok(())
    }

    /// The bookkeeping and the output of `values` once every answer is summed (all zeros, made
    /// on the pool, when no answer came: every assignment dropped or refused).
    async fn summed(self, cpu: &CpuPool, values: usize) -> Result<(Combine, Sums), ClientError> {
        for job in self.summing {
            job.await?;
        }
        let mut sums = std::mem::take(&mut *lock(&self.sums));
        if sums.output.len() != values {
            sums = cpu
                .run_sized(values, move || {
                    sums.output();
                    sums
                })
                .await?;
        }
        Ok((self.combine, sums))
    }
}

/// The answers' bookkeeping, done as each arrives: checks, bytes, the straggler's times.
struct Combine {
    worker_calls: Vec<WorkerCall>,
    /// Per answered request: (RPC time, the worker's handler time, its compute), for the straggler.
    answered: Vec<(Duration, Duration, Duration)>,
}

impl Combine {
    fn new(plan: &CallPlan) -> Self {
        Self { worker_calls: plan.worker_calls.clone(), answered: Vec::new() }
    }

    fn worker_call(&mut self, endpoint: &Endpoint) -> &mut WorkerCall {
        worker_call_of(&mut self.worker_calls, endpoint)
    }

    /// Books requests sent again, to other holders.
    fn add_requests(&mut self, requests: &[PlannedRequest]) {
        book_requests(&mut self.worker_calls, requests);
    }

    /// Checks the answer to `planned` against what was asked, books it, and hands back the
    /// response for [`Sums::add`].
    fn accept(
        &mut self,
        plan: &CallPlan,
        planned: &PlannedRequest,
        answer: Answer,
    ) -> Result<v1::ForwardResponse, ClientError> {
        let (plan_layer, plan_d_model) = (plan.layer, plan.d_model);
        let Answer { response, timing: rpc } = answer;
        let worker = Duration::from_micros(response.worker_us).min(rpc.elapsed);
        self.answered.push((rpc.elapsed, worker, response_compute(&response).min(worker)));
        let worker_call = self.worker_call(&planned.endpoint);
        worker_call.record_answer(&response, &rpc);
        if let Some(plan) = &planned.token_major {
            let combined = check_token_major(&planned.endpoint, &response, plan, plan_layer, plan_d_model)?;
            worker_call.bytes.payload_received += combined as u64;
            return Ok(response);
        }
        if response.outputs.len() != planned.pieces.len() {
            return Err(ClientError::BadResponse {
                endpoint: planned.endpoint.to_string(),
                reason: format!("{} outputs for {} expert batches", response.outputs.len(), planned.pieces.len()),
            });
        }
        for (position, (piece, output)) in planned.pieces.iter().zip(&response.outputs).enumerate() {
            let group: &ExpertAssignments = &plan.routed.groups[piece.group];
            let expert = ExpertId::new(plan.layer, group.expert);
            let (_, payload) =
                check_output(&planned.endpoint, position, output, expert, piece.end - piece.start, plan.d_model)?;
            worker_call.bytes.payload_received += payload.data.len() as u64;
        }
        Ok(response)
    }

    fn finish(
        mut self,
        plan: Arc<CallPlan>,
        sums: Sums,
        version: TableVersion,
        mut timing: TimeBreakdown,
        summing_tail: Duration,
        started: Instant,
    ) -> LayerOutput {
        // The straggler's RPC is the call's network + queue + compute time.
        if let Some((rpc, worker, compute)) = self.answered.iter().max_by_key(|(rpc, _, _)| *rpc).copied() {
            timing.network = rpc - worker;
            timing.compute = compute;
            timing.queue_wait = worker - compute;
        }
        for (endpoint, decode, combine) in &sums.per_request {
            let worker_call = self.worker_call(endpoint);
            worker_call.decode += *decode;
            worker_call.combine += *combine;
        }
        // Answers are summed while later ones are still on the wire: only the summing left after
        // the last answer is on the critical path, split in the proportion of the two phases.
        let decode: Duration = sums.per_request.iter().map(|(_, decode, _)| *decode).sum();
        let combine: Duration = sums.per_request.iter().map(|(_, _, combine)| *combine).sum();
        let share = decode.as_secs_f64() / (decode + combine).as_secs_f64().max(f64::MIN_POSITIVE);
        timing.decode = summing_tail.mul_f64(share);
        timing.combine = summing_tail - timing.decode;
        let mut bytes = ByteCounts::default();
        for worker_call in &self.worker_calls {
            bytes += worker_call.bytes;
        }
        let routing = RoutingSummary::from_routed(&plan.routed);
        let router_logits = match Arc::try_unwrap(plan) {
            Ok(plan) => plan.routed.logits,
            Err(plan) => plan.routed.logits.clone(),
        };
        timing.wall = started.elapsed();
        LayerOutput {
            hidden: sums.output,
            router_logits,
            routing,
            timing,
            bytes,
            workers: self.worker_calls,
            table_version: version,
            retried_requests: 0,
        }
    }
}

/// Rows of a token-major answer decoded at a time before they are added: a block small enough to
/// stay in cache between the two passes (224 KiB of f32 at DeepEP's 7168 values).
const COMBINE_BLOCK_ROWS: usize = 8;

/// The call's output, summed answer by answer on the CPU pool.
#[derive(Debug, Default)]
struct Sums {
    /// The output's length; `output` is allocated and zeroed by whichever of the pool's jobs
    /// reaches it first ([`Sums::output`]).
    values: usize,
    output: Vec<f32>,
    /// Decoded rows of the answer being added (a block of a token-major one).
    scratch: Vec<f32>,
    /// Decode and combine time of each answer, with its worker.
    per_request: Vec<(Endpoint, Duration, Duration)>,
}

impl Sums {
    fn new(values: usize) -> Self {
        Self { values, output: Vec::new(), scratch: Vec::new(), per_request: Vec::new() }
    }

    /// The output, zeroed on first use: by the first answer's job on the CPU pool, once the
    /// requests are out (zeroed beside them, it slowed the dispatch of the 2-core machine it was
    /// measured on), and for a large output in huge pages (DeepEP-normal's 117 MB took ~70 ms of
    /// a tokio thread when zeroed before the exchange, mostly faulting 4 KiB pages in).
    fn output(&mut self) -> &mut Vec<f32> {
        if self.output.len() != self.values {
            self.output = switchyard_common::huge_pages::zeroed_f32s(self.values);
        }
        &mut self.output
    }

    /// Decodes the (checked) answer to `planned` and adds its weighted rows into the output.
    fn add(&mut self, plan: &CallPlan, planned: &PlannedRequest, response: &v1::ForwardResponse) {
        self.output();
        let (mut decode, mut combine) = (Duration::ZERO, Duration::ZERO);
        if let (Some(tokens), Some(combined)) = (&planned.token_major, &response.combined) {
            let Ok(dtype) = WireDtype::try_from(combined.dtype) else { return };
            let block_bytes = COMBINE_BLOCK_ROWS * dtype.row_bytes(plan.d_model);
            let blocks = tokens.tokens.chunks(COMBINE_BLOCK_ROWS).zip(combined.data.chunks(block_bytes.max(1)));
            for (block_tokens, block) in blocks {
                let phase = Instant::now();
                decode_rows(block, plan.d_model, dtype, &mut self.scratch);
                let decoded = Instant::now();
                add_rows(&mut self.output, plan.d_model, block_tokens, &self.scratch);
                decode += decoded - phase;
                combine += decoded.elapsed();
            }
            self.per_request.push((planned.endpoint.clone(), decode, combine));
            return;
        }
        for (piece, output) in planned.pieces.iter().zip(&response.outputs) {
            let group: &ExpertAssignments = &plan.routed.groups[piece.group];
            let Some(payload) = &output.rows else { continue };
            let Ok(dtype) = WireDtype::try_from(payload.dtype) else { continue };

            let phase = Instant::now();
            decode_rows(&payload.data, plan.d_model, dtype, &mut self.scratch);
            decode += phase.elapsed();

            let phase = Instant::now();
            plan.routed.combine_rows(group, piece.start..piece.end, &self.scratch, plan.d_model, &mut self.output);
            combine += phase.elapsed();
        }
        self.per_request.push((planned.endpoint.clone(), decode, combine));
    }
}

/// Checks a token-major answer: one timing per planned expert, in order, and the per-token sum as
/// `[tokens, d_model]` of an answer dtype; returns the sum's bytes.
fn check_token_major(
    endpoint: &str,
    response: &v1::ForwardResponse,
    plan: &TokenPlan,
    layer: u32,
    d_model: usize,
) -> Result<usize, ClientError> {
    let bad = |reason: String| ClientError::BadResponse { endpoint: endpoint.to_owned(), reason };
    if response.outputs.len() != plan.experts.len() {
        return Err(bad(format!("{} outputs for {} experts", response.outputs.len(), plan.experts.len())));
    }
    for (position, (output, expert)) in response.outputs.iter().zip(&plan.experts).enumerate() {
        let expert = ExpertId::new(layer, *expert);
        if output.expert.map(ExpertId::from) != Some(expert) {
            return Err(bad(format!("outputs[{position}].expert is {:?}, expected {expert}", output.expert)));
        }
    }
    let combined = response.combined.as_ref().ok_or_else(|| bad("combined is missing".to_owned()))?;
    let dtype = WireDtype::try_from(combined.dtype)
        .ok()
        .filter(|dtype| dtype.answers())
        .ok_or_else(|| bad(format!("combined.dtype {} is no answer dtype", combined.dtype)))?;
    let rows = plan.tokens.len();
    if combined.shape != [rows as u64, d_model as u64] || combined.data.len() != rows * dtype.row_bytes(d_model) {
        return Err(bad(format!(
            "combined has shape {:?} and {} bytes, expected [{rows}, {d_model}]",
            combined.shape,
            combined.data.len()
        )));
    }
    Ok(combined.data.len())
}

/// The rows of answer `position`, if it answers `expert` with `[rows, d_model]` of a known dtype.
fn check_output<'a>(
    endpoint: &str,
    position: usize,
    answer: &'a v1::ExpertOutput,
    expert: ExpertId,
    rows: usize,
    d_model: usize,
) -> Result<(WireDtype, &'a v1::WireTensor), ClientError> {
    let bad = |reason: String| ClientError::BadResponse { endpoint: endpoint.to_owned(), reason };
    if answer.expert.map(ExpertId::from) != Some(expert) {
        return Err(bad(format!("outputs[{position}].expert is {:?}, expected {expert}", answer.expert)));
    }
    let payload = answer.rows.as_ref().ok_or_else(|| bad(format!("outputs[{position}].rows is missing")))?;
    let dtype = WireDtype::try_from(payload.dtype)
        .ok()
        .filter(|dtype| dtype.answers())
        .ok_or_else(|| bad(format!("outputs[{position}].rows.dtype {} is no answer dtype", payload.dtype)))?;
    if payload.shape != [rows as u64, d_model as u64] || payload.data.len() != rows * dtype.row_bytes(d_model) {
        return Err(bad(format!(
            "outputs[{position}].rows has shape {:?} and {} bytes, expected [{rows}, {d_model}]",
            payload.shape,
            payload.data.len()
        )));
    }
    Ok((dtype, payload))
}
