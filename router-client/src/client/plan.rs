//! Planning one call, on the CPU pool: gate, route, group by worker and pack ([`Planning::plan`]);
//! the [`CallPlan`] that later rounds pack more requests from (rows throttling held back, refused
//! choices moved to their tokens' next-best experts).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prost::Message;
use switchyard_model::RequestId;
use switchyard_model::checkpoint::Checkpoint;
use switchyard_proto::wire::{WireDtype, le_words};

use super::RefusalPolicy;
use crate::dispatch::{
    CallRows, DispatchLayout, Piece, PlannedRequest, by_worker, carried_choices, in_group_order, pack_pieces,
    pack_token_choices, pack_token_rows, place,
};
use crate::error::ClientError;
use crate::gate::Gate;
use crate::gate_cache::LoadOnce;
use crate::hidden::Hidden;
use crate::ledger::WorkerCall;
use crate::lock;
use crate::refusal::{TokenExperts, move_to_next_best};
use crate::replicas::Choice;
use crate::router::{ExpertAssignments, Routed, RoutingOverrides, assign, check_call, config_for_call, gate_and_route};
use crate::table::RoutingTableView;
use crate::throttle::Throttle;
use crate::timing::{GRPC_FRAME_PREFIX, TimeBreakdown};
use crate::transport::Endpoint;

/// Which gate: a layer of a synthetic model (by seed) or of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct GateKey {
    layer: u32,
    seed: u64,
    checkpoint: Option<String>,
}

/// Books `requests` in their workers' calls.
pub(super) fn book_requests(worker_calls: &mut Vec<WorkerCall>, requests: &[PlannedRequest]) {
    for planned in requests {
        let worker_call = worker_call_of(worker_calls, &planned.endpoint);
        worker_call.requests += 1;
        worker_call.rows += planned.rows();
        worker_call.bytes.payload_sent += planned.payload_bytes();
        worker_call.bytes.message_sent += planned.request.encoded_len() as u64 + GRPC_FRAME_PREFIX;
    }
}

/// `endpoint`'s call among `worker_calls`, added if it has none yet.
pub(super) fn worker_call_of<'a>(worker_calls: &'a mut Vec<WorkerCall>, endpoint: &Endpoint) -> &'a mut WorkerCall {
    match worker_calls.iter().position(|call| call.endpoint == *endpoint) {
        Some(index) => &mut worker_calls[index],
        None => {
            worker_calls.push(WorkerCall::new(endpoint.clone()));
            worker_calls.last_mut().expect("just pushed")
        }
    }
}

/// The (expert, assignments) `planned` carries.
pub(super) fn assignments_of(planned: &PlannedRequest, routed: &Routed) -> Vec<(u32, usize)> {
    if let Some(tokens) = &planned.request.tokens {
        let mut counts: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
        for expert in le_words(&tokens.experts).map(u32::from_le_bytes) {
            *counts.entry(expert).or_default() += 1;
        }
        return counts.into_iter().collect();
    }
    planned.pieces.iter().map(|piece| (routed.groups[piece.group].expert, piece.end - piece.start)).collect()
}

/// Everything planning a call needs, owned, so that it runs on the CPU pool.
pub(super) struct Planning {
    pub(super) request_id: RequestId,
    pub(super) table: Arc<RoutingTableView>,
    pub(super) layer: u32,
    pub(super) hidden: Hidden,
    pub(super) routing: RoutingOverrides,
    pub(super) gates: Arc<LoadOnce<GateKey, Gate>>,
    /// The client's CPU threads, which a large call's gate may use at once.
    pub(super) cpu_threads: usize,
    pub(super) dtype: WireDtype,
    pub(super) split_bytes: usize,
    pub(super) stripes: usize,
    pub(super) chunked: bool,
    pub(super) dispatch: DispatchLayout,
    pub(super) choice: Choice,
    pub(super) throttle: Option<Arc<Throttle>>,
    pub(super) refusal: RefusalPolicy,
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

    /// About how much CPU work [`Planning::plan`] is, in [`crate::cpu::CpuPool::run_sized`]'s units: the gate's
    /// multiply-adds over 8 and every value packed. Unbounded until the layer's gate is in memory
    /// (a checkpoint's is read from disk by the first call).
    pub(super) fn work(&self) -> usize {
        let model = &self.table.model;
        if !self.gates.is_loaded(&self.gate_key()) {
            return usize::MAX;
        }
        let experts = (model.experts_per_layer + model.shared_experts) as usize;
        self.hidden.len().saturating_mul(1 + experts / 8)
    }

    /// Gate, route, group by worker, pack: the requests of one call, and the time each step took.
    pub(super) fn plan(mut self) -> Result<(CallPlan, Vec<PlannedRequest>, TimeBreakdown), ClientError> {
        let mut timing = TimeBreakdown::default();
        let (table, layer, hidden) = (&*self.table, self.layer, &*self.hidden);
        let model = &table.model;
        let d_model = model.d_model as usize;
        check_call(model, layer, hidden)?;
        let tokens = hidden.len() / d_model;
        check_largest_batch(table, tokens)?;
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
            request_id: self.request_id.0,
            layer,
            hidden,
            d_model,
            dtype: self.dtype,
            split_bytes: self.split_bytes,
            stripes: self.stripes,
            chunked: self.chunked,
            threads: self.cpu_threads,
        };
        let (mut requests, worker_calls) = pack_by_worker(&workers, &routed.groups, self.dispatch, call);
        timing.encode = worker_calls.iter().map(|worker_call| worker_call.encode).sum();
        let mut plan = CallPlan {
            request_id: self.request_id,
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
        Ok((plan, requests, timing))
    }
}

/// Refuses a call of more tokens than the cluster's largest batch, which the expert queues are
/// sized for.
fn check_largest_batch(table: &RoutingTableView, tokens: usize) -> Result<(), ClientError> {
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
    Ok(())
}

/// Each worker's pieces packed into its requests, token-major unless `dispatch` says otherwise
/// (Soft MoE's slot inputs are not token rows: they always travel expert-major), and booked in
/// their workers' calls with the time each worker's packing took.
fn pack_by_worker(
    workers: &BTreeMap<Endpoint, Vec<Piece>>,
    groups: &[ExpertAssignments],
    dispatch: DispatchLayout,
    call: CallRows<'_>,
) -> (Vec<PlannedRequest>, Vec<WorkerCall>) {
    let mut requests: Vec<PlannedRequest> = Vec::new();
    let mut worker_calls: Vec<WorkerCall> = Vec::with_capacity(workers.len());
    for (endpoint, pieces) in workers {
        let phase = Instant::now();
        let token_major =
            dispatch == DispatchLayout::TokenMajor && pieces.iter().all(|piece| groups[piece.group].slots.is_none());
        let packed = if token_major {
            pack_token_rows(endpoint, pieces, groups, call)
        } else {
            pack_pieces(endpoint, pieces, groups, call)
        };
        book_requests(&mut worker_calls, &packed);
        worker_call_of(&mut worker_calls, endpoint).encode = phase.elapsed();
        requests.extend(packed);
    }
    (requests, worker_calls)
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
pub(super) struct CallPlan {
    request_id: RequestId,
    pub(super) layer: u32,
    pub(super) d_model: usize,
    pub(super) routed: Routed,
    hidden: Hidden,
    dtype: WireDtype,
    split_bytes: usize,
    stripes: usize,
    chunked: bool,
    pub(super) cpu_threads: usize,
    pub(super) worker_calls: Vec<WorkerCall>,
    /// (expert, assignments) overflowed because throttling held their worker back.
    pub(super) throttled: Vec<(u32, usize)>,
    /// (from, to) expert of each choice moved to its next best because throttling held its
    /// worker back ([`RefusalPolicy::NextBest`]).
    pub(super) moves: Vec<(u32, u32)>,
    /// The experts each token uses, as choices move to their next best.
    used: Mutex<TokenExperts>,
}

/// Requests carrying refused choices to their tokens' next-best experts, and what moved.
pub(super) struct NextBestRound {
    pub(super) requests: Vec<PlannedRequest>,
    pub(super) moves: Vec<(u32, u32)>,
    pub(super) overflowed: Vec<(u32, usize)>,
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
    pub(super) fn move_refused(
        &self,
        refused: &[PlannedRequest],
        table: &RoutingTableView,
        choice: &mut Choice,
    ) -> NextBestRound {
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

    pub(super) fn call_rows(&self) -> CallRows<'_> {
        CallRows {
            request_id: self.request_id.0,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::tests::{group, table};

    /// A throttle that refuses the next call to each of `full`: twenty refusals each, and the one
    /// call error diffusion lets through after them.
    fn refusing(full: &[&str]) -> Throttle {
        let throttle = Throttle::new(2.0);
        for endpoint in full {
            let endpoint: Endpoint = Arc::from(*endpoint);
            for _ in 0..20 {
                throttle.record(&endpoint, crate::throttle::Verdict::Refused);
            }
            assert!(throttle.admit(&endpoint).is_ok(), "the refusal owed is still below one");
        }
        throttle
    }

    /// [`hold_back_throttled`] on layer 0 for a call of its own.
    fn hold_back(
        throttle: &Throttle,
        policy: RefusalPolicy,
        table: &RoutingTableView,
        groups: &[ExpertAssignments],
        workers: &mut BTreeMap<Endpoint, Vec<Piece>>,
    ) -> Result<Vec<Piece>, ClientError> {
        hold_back_throttled(throttle, policy, groups, table, 0, &mut Choice::default(), workers)
    }

    fn rows_to(workers: &BTreeMap<Endpoint, Vec<Piece>>) -> Vec<(&str, usize)> {
        workers.iter().map(|(endpoint, pieces)| (&**endpoint, pieces.iter().map(|p| p.end - p.start).sum())).collect()
    }

    /// Expert 0's rows, placed on a, move to its other holders when a is throttled; c, which only
    /// the moved rows reach, is asked too and refuses, so they end on b.
    #[test]
    fn held_back_rows_pass_every_throttled_holder_they_reach() {
        let table = table(|expert| if expert == 0 { vec!["a", "c", "b"] } else { vec!["b"] });
        let groups = [group(0, 4)];
        let mut workers = BTreeMap::from([(Endpoint::from("a"), vec![Piece { group: 0, start: 0, end: 4 }])]);
        let held_back = hold_back(&refusing(&["a", "c"]), RefusalPolicy::Fail, &table, &groups, &mut workers)
            .expect("b takes the rows");
        assert!(held_back.is_empty());
        assert_eq!(rows_to(&workers), [("b", 4)]);
    }

    /// With every holder throttled the rows are held back: the call fails naming the first worker
    /// refused, or under another policy the rows come back to be treated as refused.
    #[test]
    fn rows_no_holder_admits_fail_the_call_or_come_back() {
        let table = table(|expert| if expert == 0 { vec!["a", "c"] } else { vec!["b"] });
        let groups = [group(0, 4), group(1, 2)];
        let placed = || {
            BTreeMap::from([
                (Endpoint::from("a"), vec![Piece { group: 0, start: 0, end: 4 }]),
                (Endpoint::from("b"), vec![Piece { group: 1, start: 0, end: 2 }]),
            ])
        };
        let mut workers = placed();
        let throttle = refusing(&["a", "c"]);
        let error = hold_back(&throttle, RefusalPolicy::Fail, &table, &groups, &mut workers)
            .expect_err("no holder of expert 0 admits the call");
        assert!(matches!(&error, ClientError::Throttled { endpoint, accepts: 0, .. } if endpoint == "a"), "{error:?}");

        let mut workers = placed();
        let throttle = refusing(&["a", "c"]);
        let held_back = hold_back(&throttle, RefusalPolicy::Overflow, &table, &groups, &mut workers).expect("overflow");
        assert_eq!(held_back, [Piece { group: 0, start: 0, end: 4 }]);
        assert_eq!(rows_to(&workers), [("b", 2)]);
    }
}
