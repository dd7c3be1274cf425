//! [`MoeClient`]: one MoE layer call, distributed, as plan → exchange → combine. Gate and route
//! here and pack each worker's rows ([`crate::dispatch`]); send them all at once over the transport
//! and combine each answer as it arrives ([`crate::exchange`]); say where the time and bytes went.

mod combine;
mod plan;
mod rounds;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use switchyard_model::{RequestId, TableVersion};
use switchyard_proto::wire::WireDtype;
use tracing::Instrument;

use self::combine::Collecting;
use self::plan::{CallPlan, GateKey, Planning, assignments_of};
use self::rounds::{Retry, Rounds};
use crate::cpu::CpuPool;
use crate::dispatch::{DispatchLayout, PlannedRequest, reroute};
use crate::error::ClientError;
use crate::exchange::{self, DestinationOutcome, Outcome};
use crate::gate::Gate;
use crate::gate_cache::LoadOnce;
use crate::hidden::Hidden;
use crate::ledger::WorkerCall;
use crate::metrics::ClientMetrics;
use crate::replicas::Replicas;
use crate::router::{RoutingOverrides, RoutingSummary};
use crate::table::{RoutingTableView, TableReceiver};
use crate::throttle::{Throttle, Verdict};
use crate::timing::{ByteCounts, TimeBreakdown};
use crate::transport::{Endpoint, ExpertTransport, GrpcTransport};

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
                    || (refusals_tolerated && error.is_queue_full())
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
        let (worst, first_error) = self.give_up_failed(finished, rounds);
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
        let (refused, failed): (Vec<&PlannedRequest>, Vec<&PlannedRequest>) =
            finished.unanswered.iter().map(|&index| &round[index]).partition(|planned| {
                refusals_tolerated
                    && error_at(&planned.endpoint).is_some_and(ClientError::is_queue_full)
                    && !another_holder_for_each(planned)
            });
        let mut next_round = self.settle_refused(plan, &refused, rounds).await?;
        if !failed.is_empty() {
            next_round.extend(self.send_elsewhere(plan, &failed, worst, first_error, rounds).await?);
        }
        Ok(next_round)
    }

    /// Gives up each worker that failed in `finished` for the rest of the call (and one that did
    /// worse than refuse for want of room, for a while); returns what the worst failure allows and
    /// the first error, which the call ends with if nothing else can take the rows.
    fn give_up_failed(&self, finished: &exchange::Round, rounds: &mut Rounds) -> (Retry, ClientError) {
        let mut worst = Retry::OtherHolder;
        let mut first_error = None;
        for (endpoint, error) in finished.failures() {
            tracing::debug!(%endpoint, %error, "worker failed; sending its rows to another holder");
            rounds.excluded.insert(endpoint.clone());
            // A full queue is one expert's, on a worker that answered: later calls still use the
            // worker (spreading by assignments in flight and the throttle pace it); one that
            // failed or stalled is avoided for a while.
            if !error.is_queue_full() {
                self.replicas.suspect(endpoint);
            }
            worst = worst.max(Retry::of(error));
            first_error.get_or_insert_with(|| error.clone());
        }
        (worst, first_error.expect("unanswered requests come from a failed worker"))
    }

    /// What the refusal policy makes of `refused`, requests a full queue refused with no other
    /// holder to take them: under [`RefusalPolicy::NextBest`], the requests carrying their choices
    /// to their tokens' next-best experts; otherwise none, their assignments counted as refused.
    async fn settle_refused(
        &self,
        plan: &Arc<CallPlan>,
        refused: &[&PlannedRequest],
        rounds: &mut Rounds,
    ) -> Result<Vec<PlannedRequest>, ClientError> {
        if self.options.refusal != RefusalPolicy::NextBest || refused.is_empty() {
            for planned in refused {
                rounds.refused.extend(assignments_of(planned, &plan.routed));
            }
            return Ok(Vec::new());
        }
        let refused: Vec<PlannedRequest> = refused.iter().map(|planned| (*planned).clone()).collect();
        let mut choice = self.replicas.choice(rounds.request_id.0, rounds.excluded.clone());
        let (plan, moved_on) = (plan.clone(), rounds.table.clone());
        let moved = self.cpu.run(move || plan.move_refused(&refused, &moved_on, &mut choice)).await?;
        rounds.moves.extend(moved.moves);
        rounds.refused.extend(moved.overflowed);
        Ok(moved.requests)
    }

    /// Requests carrying `failed`'s rows to other holders of their experts. With no holder left,
    /// a worker that is gone (`worst` allows a new table) comes back in a table that moves its
    /// experts, waited for within the deadline; a full queue or a stalled worker with no other
    /// holder ends the call with `first_error`, as it would have without replicas.
    async fn send_elsewhere(
        &self,
        plan: &Arc<CallPlan>,
        failed: &[&PlannedRequest],
        worst: Retry,
        first_error: ClientError,
        rounds: &mut Rounds,
    ) -> Result<Vec<PlannedRequest>, ClientError> {
        rounds.retried_requests += failed.len();
        let failed: Arc<Vec<PlannedRequest>> = Arc::new(failed.iter().map(|planned| (*planned).clone()).collect());
        loop {
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
                Ok(requests) => return Ok(requests),
                Err(ClientError::Unplaced { .. }) if worst == Retry::OtherHolderOrNewTable => {
                    rounds.table =
                        self.newer_table(&rounds.table, rounds.deadline).await.ok_or_else(|| first_error.clone())?;
                    rounds.excluded.clear();
                }
                Err(ClientError::Unplaced { .. }) => return Err(first_error),
                Err(error) => return Err(error),
            }
        }
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
