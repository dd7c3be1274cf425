//! The dispatch plan: the kept assignments grouped by worker, then packed into requests.
//!
//! Token-major by default (DeepEP's layout): each token travels once to each worker holding any
//! of its experts, with the (expert, weight) pairs it chose there, and comes back as one
//! gate-weighted sum, so top-k routing over few workers sends far fewer rows than assignments.
//! Expert-major (one row per assignment, answered row by row) remains for Soft MoE, whose slot
//! inputs are not token rows, and on request ([`DispatchLayout`]). A worker whose payload exceeds
//! `split_bytes` gets several requests, cut by whole rows, so no batch is ever refused by a message
//! size limit.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use switchyard_model::ExpertId;
use switchyard_proto::v1;
use switchyard_proto::wire::{self, WireDtype, le_words};

use crate::codec::gather_requests;
use crate::error::ClientError;
use crate::replicas::Choice;
use crate::router::ExpertAssignments;
use crate::table::RoutingTableView;
use crate::transport::Endpoint;

/// Rows `start..end` of group `group` (an index into the call's groups) placed in one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub group: usize,
    pub start: usize,
    pub end: usize,
}

/// How a call's rows travel to the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DispatchLayout {
    /// Each token once per worker, answered as one weighted sum per token (not for Soft MoE).
    #[default]
    TokenMajor,
    /// Each (token, expert) assignment's row, answered row by row.
    ExpertMajor,
}

/// A request ready to send, with how to map its answer back.
#[derive(Debug, Clone)]
pub struct PlannedRequest {
    pub endpoint: Endpoint,
    pub request: v1::ForwardRequest,
    /// Expert-major: aligned with `request.batches`.
    pub pieces: Vec<Piece>,
    /// Token-major: the call's tokens of the request's rows, and its experts in the order the
    /// worker answers them (ascending).
    pub token_major: Option<TokenPlan>,
    /// Requests to one worker with the same stream go as chunks of one `ForwardStream`, in order,
    /// so the worker starts on the first while the rest arrive; different streams go over
    /// different connections at once.
    pub stream: usize,
}

/// A token-major request's rows and experts.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenPlan {
    pub tokens: Vec<u32>,
    pub experts: Vec<u32>,
}

impl PlannedRequest {
    /// Rows this request carries.
    pub fn rows(&self) -> usize {
        match &self.token_major {
            Some(plan) => plan.tokens.len(),
            None => self.pieces.iter().map(|piece| piece.end - piece.start).sum(),
        }
    }

    /// (token, expert) assignments this request carries: the expert rows its worker computes.
    pub fn assignments(&self) -> usize {
        match &self.request.tokens {
            Some(tokens) => tokens.experts.len() / size_of::<u32>(),
            None => self.rows(),
        }
    }

    /// Payload bytes this request carries.
    pub fn payload_bytes(&self) -> u64 {
        let tokens = self.request.tokens.as_ref().and_then(|tokens| tokens.rows.as_ref());
        let batches = self.request.batches.iter().filter_map(|batch| batch.rows.as_ref());
        tokens.into_iter().chain(batches).map(|rows| rows.data.len() as u64).sum()
    }
}

/// Packs one worker's groups token-major: each token that chose any of them once, with its
/// (expert, weight) pairs, in requests of at most `split_bytes` of rows (at least one token each),
/// spread over the stripes when large.
pub fn pack_token_rows(
    endpoint: &Arc<str>,
    pieces: &[Piece],
    groups: &[ExpertAssignments],
    call: CallRows<'_>,
) -> Vec<PlannedRequest> {
    // (token, expert, weight) of every kept assignment; one flat buffer: no allocation per token.
    let choices: Vec<(u32, u32, f32)> = pieces
        .iter()
        .flat_map(|piece| {
            let group = &groups[piece.group];
            let rows = group.tokens[piece.start..piece.end].iter().zip(&group.weights[piece.start..piece.end]);
            rows.map(move |(token, weight)| (*token, group.expert, *weight))
        })
        .collect();
    pack_token_choices(endpoint, choices, call)
}

/// Packs (token, expert, weight) choices token-major, as [`pack_token_rows`] does.
pub fn pack_token_choices(
    endpoint: &Arc<str>,
    mut choices: Vec<(u32, u32, f32)>,
    call: CallRows<'_>,
) -> Vec<PlannedRequest> {
    let CallRows { request_id, layer, hidden, d_model, dtype, threads, .. } = call;
    // By token; the sort is stable, so a token's experts stay in group order.
    choices.sort_by_key(|(token, _, _)| *token);
    let token_starts: Vec<usize> =
        (0..choices.len()).filter(|&at| at == 0 || choices[at].0 != choices[at - 1].0).collect();
    let tokens_per_request = call.rows_per_request(token_starts.len());
    let chunks: Vec<(&[usize], usize)> = token_starts
        .chunks(tokens_per_request)
        .enumerate()
        .map(|(chunk, starts)| {
            (starts, token_starts.get((chunk + 1) * tokens_per_request).copied().unwrap_or(choices.len()))
        })
        .collect();
    let token_ids: Vec<Vec<u32>> =
        chunks.iter().map(|(starts, _)| starts.iter().map(|&start| choices[start].0).collect()).collect();
    let token_lists: Vec<&[u32]> = token_ids.iter().map(Vec::as_slice).collect();
    let payloads = gather_requests(hidden, d_model, &token_lists, dtype, threads);
    let mut requests: Vec<PlannedRequest> = chunks
        .into_iter()
        .zip(token_ids)
        .zip(payloads)
        .map(|(((starts, end), token_ids), payload)| {
            let pairs = &choices[starts[0]..end];
            let mut offsets = Vec::with_capacity(4 * (starts.len() + 1));
            for start in starts.iter().chain(std::iter::once(&end)) {
                offsets.extend(((start - starts[0]) as u32).to_le_bytes());
            }
            let (mut experts, mut weights) = (Vec::with_capacity(4 * pairs.len()), Vec::with_capacity(4 * pairs.len()));
            for (_, expert, weight) in pairs {
                experts.extend(expert.to_le_bytes());
                weights.extend(weight.to_le_bytes());
            }
            let mut answered: Vec<u32> = pairs.iter().map(|(_, expert, _)| *expert).collect();
            answered.sort_unstable();
            answered.dedup();
            let request = v1::ForwardRequest {
                request_id,
                batches: Vec::new(),
                output_dtype: dtype.answer_dtype().to_proto() as i32,
                tokens: Some(v1::TokenRows {
                    layer,
                    rows: Some(v1::WireTensor {
                        dtype: dtype.to_proto() as i32,
                        shape: vec![token_ids.len() as u64, d_model as u64],
                        data: payload,
                    }),
                    offsets: offsets.into(),
                    experts: experts.into(),
                    weights: weights.into(),
                }),
                sequence: 0,
            };
            PlannedRequest {
                endpoint: endpoint.clone(),
                request,
                pieces: Vec::new(),
                token_major: Some(TokenPlan { tokens: token_ids, experts: answered }),
                stream: 0,
            }
        })
        .collect();
    call.assign_streams(token_starts.len(), &mut requests);
    requests
}

/// Groups `groups` by the worker each expert's rows are sent to: each expert's rows are spread
/// over its holders as [`Choice::spread`] says (Soft MoE's slot rows go whole to one). Experts with
/// one holder go first, then the replicated ones, largest first, each spread over its holders by
/// how much they have by then: a worker that must take its own experts' rows is given less of the
/// shared ones. Each worker's pieces are in group order.
pub fn by_worker(
    layer: u32,
    groups: &[ExpertAssignments],
    table: &RoutingTableView,
    choice: &mut Choice,
) -> Result<BTreeMap<Arc<str>, Vec<Piece>>, ClientError> {
    let d_model = table.model.d_model as usize;
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by_key(|&index| {
        let group = &groups[index];
        (table.endpoints(layer, group.expert).len() > 1, std::cmp::Reverse(group.rows(d_model)))
    });
    let mut workers: BTreeMap<Arc<str>, Vec<Piece>> = BTreeMap::new();
    for index in order {
        let whole = Piece { group: index, start: 0, end: groups[index].rows(d_model) };
        if !place(whole, groups, table, layer, choice, &mut workers) {
            return Err(unplaced(table, layer, groups[index].expert));
        }
    }
    in_group_order(&mut workers);
    Ok(workers)
}

/// Adds `piece` to `workers`: spread over the holders of its expert that `choice` allows, as
/// [`Choice::spread`] says, or whole to one when the expert has one holder or the rows are Soft
/// MoE's slots. False when `choice` allows none of them.
pub fn place(
    piece: Piece,
    groups: &[ExpertAssignments],
    table: &RoutingTableView,
    layer: u32,
    choice: &mut Choice,
    workers: &mut BTreeMap<Arc<str>, Vec<Piece>>,
) -> bool {
    let group = &groups[piece.group];
    let holders = table.endpoints(layer, group.expert);
    let rows = piece.end - piece.start;
    // One holder (most experts, and every one without replicas) needs no spreading.
    if group.slots.is_some() || holders.len() == 1 {
        let Some(endpoint) = choice.pick(holders, rows) else { return false };
        workers.entry(endpoint.clone()).or_default().push(piece);
        return true;
    }
    let shares = choice.spread(holders, rows);
    let mut start = piece.start;
    for (holder, share) in &shares {
        let part = Piece { group: piece.group, start, end: start + share };
        workers.entry(holders[*holder].clone()).or_default().push(part);
        start += share;
    }
    !shares.is_empty()
}

/// Sorts each worker's pieces by group and row, the order packing keeps.
pub fn in_group_order(workers: &mut BTreeMap<Arc<str>, Vec<Piece>>) {
    for pieces in workers.values_mut() {
        pieces.sort_unstable_by_key(|piece| (piece.group, piece.start));
    }
}

fn unplaced(table: &RoutingTableView, layer: u32, expert: u32) -> ClientError {
    ClientError::Unplaced { version: table.version, expert: ExpertId::new(layer, expert) }
}

fn pick<'a>(
    layer: u32,
    expert: u32,
    assignments: usize,
    table: &'a RoutingTableView,
    choice: &mut Choice,
) -> Result<&'a Endpoint, ClientError> {
    choice.pick(table.endpoints(layer, expert), assignments).ok_or_else(|| unplaced(table, layer, expert))
}

/// The requests that carry again what `failed` carried, to the holders of its experts that
/// `choice` allows: a token-major request's (token, expert) choices one by one, an expert-major
/// one's pieces spread as [`place`] spreads them.
/// Fails [`ClientError::Unplaced`] when an expert has no holder left.
pub fn reroute(
    failed: &[&PlannedRequest],
    groups: &[ExpertAssignments],
    table: &RoutingTableView,
    choice: &mut Choice,
    call: CallRows<'_>,
) -> Result<Vec<PlannedRequest>, ClientError> {
    let mut choices: BTreeMap<Arc<str>, Vec<(u32, u32, f32)>> = BTreeMap::new();
    let mut pieces: BTreeMap<Arc<str>, Vec<Piece>> = BTreeMap::new();
    for planned in failed {
        match &planned.token_major {
            Some(_) => {
                for carried in carried_choices(planned, groups).unwrap_or_default() {
                    let endpoint = pick(call.layer, carried.1, 1, table, choice)?;
                    choices.entry(endpoint.clone()).or_default().push(carried);
                }
            }
            None => {
                for piece in &planned.pieces {
                    if !place(*piece, groups, table, call.layer, choice, &mut pieces) {
                        return Err(unplaced(table, call.layer, groups[piece.group].expert));
                    }
                }
            }
        }
    }
    let mut requests = Vec::new();
    for (endpoint, choices) in choices {
        requests.extend(pack_token_choices(&endpoint, choices, call));
    }
    in_group_order(&mut pieces);
    for (endpoint, pieces) in pieces {
        requests.extend(pack_pieces(&endpoint, &pieces, groups, call));
    }
    Ok(requests)
}

/// The (token, expert, weight) choices `planned` carries: a token-major request's, or an
/// expert-major one's pieces as the token rows they are. `None` for Soft MoE's slot rows, which
/// are no token's.
pub fn carried_choices(planned: &PlannedRequest, groups: &[ExpertAssignments]) -> Option<Vec<(u32, u32, f32)>> {
    let mut carried = Vec::new();
    match &planned.token_major {
        Some(plan) => {
            // Read from the request itself: an expert's rows may be spread over several workers.
            let rows = planned.request.tokens.as_ref()?;
            let offsets: Vec<u32> = le_words(&rows.offsets).map(u32::from_le_bytes).collect();
            let experts: Vec<u32> = le_words(&rows.experts).map(u32::from_le_bytes).collect();
            let weights: Vec<f32> = le_words(&rows.weights).map(f32::from_le_bytes).collect();
            for (position, token) in plan.tokens.iter().enumerate() {
                for at in offsets[position] as usize..offsets[position + 1] as usize {
                    carried.push((*token, experts[at], weights[at]));
                }
            }
        }
        None => {
            for piece in &planned.pieces {
                let group = &groups[piece.group];
                if group.slots.is_some() {
                    return None;
                }
                let rows = group.tokens[piece.start..piece.end].iter().zip(&group.weights[piece.start..piece.end]);
                carried.extend(rows.map(|(token, weight)| (*token, group.expert, *weight)));
            }
        }
    }
    Some(carried)
}

/// What every request of one layer call shares.
#[derive(Debug, Clone, Copy)]
pub struct CallRows<'a> {
    /// The call's id, which every request carries (and the booked bytes count).
    pub request_id: u64,
    pub layer: u32,
    /// The call's `[tokens, d_model]` input.
    pub hidden: &'a [f32],
    pub d_model: usize,
    pub dtype: WireDtype,
    /// Most payload bytes in one request.
    pub split_bytes: usize,
    /// Connections to each worker: a large payload is spread over up to as many requests, so that
    /// every connection carries a share of at least [`STRIPE_MIN_BYTES`].
    pub stripes: usize,
    /// Whether a stripe above [`CHUNK_BYTES`] goes as a stream of chunks (else each of its requests
    /// is a call of its own).
    pub chunked: bool,
    /// Threads a large payload's encode may use at once (the client's CPU threads).
    pub threads: usize,
}

/// A stripe larger than this goes as chunks of about this size on one stream ([`PlannedRequest::stream`]):
/// the worker computes the first while the rest arrive, and its answers come back while later
/// chunks are still on their way.
pub const CHUNK_BYTES: usize = 4 << 20;

/// The least payload a stripe carries. A smaller share gains less from its own connection than
/// its request costs: DeepEP's low-latency preset (1.8 MB per worker) dispatched in 2.6 ms as one
/// request and 3.3 ms as two on the 2-core development machine, its normal one (58 MB) in 86 ms
/// as one and 72 ms as two.
pub const STRIPE_MIN_BYTES: usize = 4 << 20;

impl CallRows<'_> {
    /// Rows per request for `rows` rows to one worker: at most `split_bytes` of them, and spread
    /// over the stripes when the payload is large enough to gain from it.
    fn rows_per_request(&self, rows: usize) -> usize {
        let row_bytes = self.dtype.row_bytes(self.d_model);
        let mut per_request = (self.split_bytes / row_bytes).max(1);
        // Each stripe's share: with one, all the rows, so that its chunks below are cut from
        // them, not from the split limit.
        per_request = per_request.min(rows.div_ceil(self.stripes_for(rows)));
        if self.chunked && per_request * row_bytes > CHUNK_BYTES {
            // Equal chunks of at most about `CHUNK_BYTES`, so that the stripes stay equal too.
            per_request = per_request.div_ceil((per_request * row_bytes).div_ceil(CHUNK_BYTES));
        }
        per_request.max(1)
    }

    /// Connections `rows` rows to one worker are spread over.
    fn stripes_for(&self, rows: usize) -> usize {
        self.stripes.min(rows * self.dtype.row_bytes(self.d_model) / STRIPE_MIN_BYTES).max(1)
    }

    /// Deals one worker's requests (of `rows` rows in all) to streams: chunks to their stripes in
    /// turn, each stripe's in order on one stream; unchunked, each request a call of its own (a
    /// unary `Forward`, which the worker reads and answers in place, where a `ForwardStream` of
    /// several goes through tonic's copying codec: DeepEP-normal's dispatch took 140-207 ms as two
    /// streams of two requests and 72-107 ms as four calls, alternated).
    fn assign_streams(&self, rows: usize, requests: &mut [PlannedRequest]) {
        let streams = if self.chunked { self.stripes_for(rows) } else { requests.len() };
        for (index, planned) in requests.iter_mut().enumerate() {
            planned.stream = index % streams.max(1);
        }
    }
}

/// Packs one worker's pieces of groups expert-major, in requests of at most `split_bytes` payload
/// (at least one row each), spread over the stripes when large.
pub fn pack_pieces(
    endpoint: &Arc<str>,
    pieces: &[Piece],
    groups: &[ExpertAssignments],
    call: CallRows<'_>,
) -> Vec<PlannedRequest> {
    let CallRows { request_id, layer, hidden, d_model, dtype, threads, .. } = call;
    let empty_request = || new_request(endpoint, request_id, dtype);
    let rows = pieces.iter().map(|piece| piece.end - piece.start).sum();
    let rows_per_request = call.rows_per_request(rows);
    let mut requests = Vec::new();
    let mut current = empty_request();
    let mut current_rows = 0;
    // The batches whose rows are gathered from `hidden`, as (request, batch, tokens): encoded all
    // together once every request is laid out, over the call's threads.
    let mut gathered: Vec<(usize, usize, &[u32])> = Vec::new();
    for piece in pieces {
        let group = &groups[piece.group];
        let mut start = piece.start;
        while start < piece.end {
            if current_rows == rows_per_request {
                requests.push(std::mem::replace(&mut current, empty_request()));
                current_rows = 0;
            }
            let end = piece.end.min(start + rows_per_request - current_rows);
            let data = match &group.slots {
                Some(slots) => wire::encode_rows(&slots.inputs[start * d_model..end * d_model], d_model, dtype),
                None => {
                    gathered.push((requests.len(), current.request.batches.len(), &group.tokens[start..end]));
                    Bytes::new()
                }
            };
            current.request.batches.push(v1::ExpertRows {
                expert: Some(ExpertId::new(layer, group.expert).into()),
                rows: Some(v1::WireTensor {
                    dtype: dtype.to_proto() as i32,
                    shape: vec![(end - start) as u64, d_model as u64],
                    data,
                }),
            });
            current.pieces.push(Piece { group: piece.group, start, end });
            current_rows += end - start;
            start = end;
        }
    }
    if !current.pieces.is_empty() {
        requests.push(current);
    }
    let token_lists: Vec<&[u32]> = gathered.iter().map(|(_, _, tokens)| *tokens).collect();
    let payloads = gather_requests(hidden, d_model, &token_lists, dtype, threads);
    for ((request, batch, _), payload) in gathered.into_iter().zip(payloads) {
        if let Some(rows) = &mut requests[request].request.batches[batch].rows {
            rows.data = payload;
        }
    }
    call.assign_streams(rows, &mut requests);
    requests
}

fn new_request(endpoint: &Arc<str>, request_id: u64, dtype: WireDtype) -> PlannedRequest {
    PlannedRequest {
        endpoint: endpoint.clone(),
        request: v1::ForwardRequest {
            request_id,
            batches: Vec::new(),
            output_dtype: dtype.answer_dtype().to_proto() as i32,
            tokens: None,
            sequence: 0,
        },
        pieces: Vec::new(),
        token_major: None,
        stream: 0,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Expert `expert`'s assignments of the call's first `tokens` tokens, each weighted 1.
    pub(crate) fn group(expert: u32, tokens: usize) -> ExpertAssignments {
        ExpertAssignments { expert, tokens: (0..tokens as u32).collect(), weights: vec![1.0; tokens], slots: None }
    }

    /// A call of f32 rows `d_model` wide over one connection, at most `split_bytes` per request.
    fn f32_call(hidden: &[f32], d_model: usize, split_bytes: usize) -> CallRows<'_> {
        CallRows {
            request_id: 1,
            layer: 0,
            hidden,
            d_model,
            dtype: WireDtype::F32,
            split_bytes,
            stripes: 1,
            chunked: false,
            threads: 1,
        }
    }

    /// Every row of each of `groups`.
    fn whole(groups: &[ExpertAssignments]) -> Vec<Piece> {
        groups.iter().enumerate().map(|(group, rows)| Piece { group, start: 0, end: rows.tokens.len() }).collect()
    }

    #[test]
    fn small_payloads_travel_in_one_request_per_worker() {
        let groups = [group(0, 3), group(1, 2)];
        let hidden = vec![0.5; 3 * 4];
        let endpoint: Arc<str> = Arc::from("http://a");
        let requests = pack_pieces(&endpoint, &whole(&groups), &groups, f32_call(&hidden, 4, 1 << 20));
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].request.batches.len(), 2);
        assert_eq!(requests[0].request.batches[0].rows.as_ref().map(|r| r.data.len()), Some(3 * 4 * 4));
        assert_eq!((requests[0].rows(), requests[0].assignments()), (5, 5), "a row per assignment");
    }

    #[test]
    fn large_payloads_split_by_whole_rows_and_cover_every_row_once() {
        let groups = [group(0, 5), group(1, 4)];
        let hidden = vec![0.5; 5 * 4];
        let endpoint: Arc<str> = Arc::from("http://a");
        // 16 bytes per row (4 x f32); 48 bytes per request = 3 rows.
        let requests = pack_pieces(&endpoint, &whole(&groups), &groups, f32_call(&hidden, 4, 48));
        let pieces: Vec<Vec<Piece>> = requests.iter().map(|r| r.pieces.clone()).collect();
        assert_eq!(
            pieces,
            [
                vec![Piece { group: 0, start: 0, end: 3 }],
                vec![Piece { group: 0, start: 3, end: 5 }, Piece { group: 1, start: 0, end: 1 }],
                vec![Piece { group: 1, start: 1, end: 4 }],
            ]
        );
        assert!(requests.iter().all(|r| {
            r.request.batches.iter().map(|b| b.rows.as_ref().map_or(0, |t| t.data.len())).sum::<usize>() <= 48
        }));
        assert_eq!(requests.iter().map(PlannedRequest::rows).collect::<Vec<_>>(), [3, 3, 3]);
    }

    /// Soft MoE's slot rows split like token rows: the second request carries slots 3 and 4.
    #[test]
    fn slot_rows_split_by_whole_slots() {
        let inputs: Vec<f32> = (0..5 * 4).map(|value| value as f32).collect();
        let slots = ExpertAssignments {
            expert: 2,
            tokens: Vec::new(),
            weights: Vec::new(),
            slots: Some(crate::router::SlotRows { first_slot: 0, inputs }),
        };
        let groups = [slots];
        // 16 bytes per row (4 x f32); 48 bytes per request = 3 slots.
        let pieces = [Piece { group: 0, start: 0, end: 5 }];
        let requests = pack_pieces(&Arc::from("w"), &pieces, &groups, f32_call(&[], 4, 48));
        let data = requests[1].request.batches[0].rows.as_ref().expect("rows").data.clone();
        let values: Vec<f32> = le_words(&data).map(f32::from_le_bytes).collect();
        assert_eq!(values, (12..20).map(|value| value as f32).collect::<Vec<_>>());
    }

    /// A table of the synthetic model whose expert `e` is held by `holders(e)`.
    pub(crate) fn table(holders: impl Fn(u32) -> Vec<&'static str>) -> RoutingTableView {
        let model = switchyard_model::ModelSpec::default_synthetic();
        let routes = (0..model.experts_per_layer)
            .map(|expert| v1::ExpertRoute {
                expert: Some(v1::ExpertKey::new(0, expert)),
                endpoints: holders(expert).into_iter().map(String::from).collect(),
            })
            .collect();
        let table = v1::RoutingTable {
            version: 1,
            epoch: 1,
            model: Some(model.to_proto()),
            routes,
            queue_limit_tokens: 64,
            max_batch_tokens: 64,
        };
        RoutingTableView::try_from(table).expect("valid table")
    }

    #[test]
    fn replicated_experts_even_out_what_the_call_sends_each_holder() {
        let replicas = crate::replicas::Replicas::default();
        // Experts 0 and 1 on both, 2 only on a, the rest on b: a takes 2's 4 rows whatever the
        // salt, so the 9 replicated rows go 4 to b first, then 5 shared.
        let table = table(|expert| match expert {
            0 | 1 => vec!["a", "b"],
            2 => vec!["a"],
            _ => vec!["b"],
        });
        let groups = [group(0, 3), group(1, 6), group(2, 4)];
        for salt in 0..4 {
            let mut choice = replicas.choice(salt, Default::default());
            let workers = by_worker(0, &groups, &table, &mut choice).expect("placed");
            let rows_to = |worker: &str| workers[worker].iter().map(|piece| piece.end - piece.start).sum::<usize>();
            assert!(rows_to("a").abs_diff(rows_to("b")) <= 1, "salt {salt}: {workers:?}");
            assert!(workers["b"].iter().all(|piece| piece.group != 2));
            for pieces in workers.values() {
                assert!(pieces.is_sorted_by_key(|piece| (piece.group, piece.start)), "in group order: {pieces:?}");
            }
            for (index, group) in groups.iter().enumerate() {
                let mut covered: Vec<(usize, usize)> = workers
                    .values()
                    .flatten()
                    .filter(|piece| piece.group == index)
                    .map(|piece| (piece.start, piece.end))
                    .collect();
                covered.sort_unstable();
                let contiguous = covered.windows(2).all(|pair| pair[0].1 == pair[1].0);
                assert!(
                    contiguous && covered[0].0 == 0 && covered.last().map(|last| last.1) == Some(group.tokens.len())
                );
            }
        }
    }

    /// Experts held by one worker are placed first: the replicated expert's rows then even out
    /// what each holder has (placed the other way round, a would end with 5 rows and b with 3).
    #[test]
    fn a_replicated_expert_fills_in_around_the_experts_only_one_worker_holds() {
        let replicas = crate::replicas::Replicas::default();
        let table = table(|expert| if expert == 0 { vec!["a", "b"] } else { vec!["a"] });
        let groups = [group(0, 6), group(1, 2)];
        for salt in 0..2 {
            let mut choice = replicas.choice(salt, Default::default());
            let workers = by_worker(0, &groups, &table, &mut choice).expect("placed");
            let rows_to = |worker: &str| workers[worker].iter().map(|piece| piece.end - piece.start).sum::<usize>();
            assert_eq!((rows_to("a"), rows_to("b")), (4, 4), "salt {salt}: {workers:?}");
        }
    }

    /// Soft MoE's slot rows are one expert's slots, mixed from every token: they go whole to one
    /// holder of a replicated expert, never spread.
    #[test]
    fn slot_rows_of_a_replicated_expert_go_whole_to_one_holder() {
        let replicas = crate::replicas::Replicas::default();
        // The synthetic model's rows are 1024 wide: 4 slots.
        let table = table(|_| vec!["a", "b"]);
        let slots = ExpertAssignments {
            expert: 0,
            tokens: Vec::new(),
            weights: Vec::new(),
            slots: Some(crate::router::SlotRows { first_slot: 0, inputs: vec![0.5; 4 * 1024] }),
        };
        for salt in 0..2 {
            let workers =
                by_worker(0, std::slice::from_ref(&slots), &table, &mut replicas.choice(salt, Default::default()))
                    .expect("placed");
            let pieces: Vec<&Piece> = workers.values().flatten().collect();
            assert_eq!(pieces, [&Piece { group: 0, start: 0, end: 4 }], "salt {salt}: {workers:?}");
        }
    }

    fn le_u32(bytes: &[u8]) -> Vec<u32> {
        le_words(bytes).map(u32::from_le_bytes).collect()
    }

    #[test]
    fn token_major_sends_each_token_once_per_worker_with_its_choices_there() {
        let groups = [
            ExpertAssignments { expert: 0, tokens: vec![0, 1, 2], weights: vec![0.5, 0.25, 0.75], slots: None },
            ExpertAssignments { expert: 3, tokens: vec![1, 2, 4], weights: vec![0.125, 0.0625, 1.0], slots: None },
        ];
        let hidden: Vec<f32> = (0..5 * 2).map(|value| value as f32).collect();
        let endpoint: Arc<str> = Arc::from("http://a");
        // 8 bytes per row (2 x f32); 16 bytes per request = 2 tokens.
        let call = CallRows { layer: 7, ..f32_call(&hidden, 2, 16) };
        let requests = pack_token_rows(&endpoint, &whole(&groups), &groups, call);
        let plans: Vec<TokenPlan> = requests.iter().filter_map(|r| r.token_major.clone()).collect();
        assert_eq!(
            plans,
            [
                TokenPlan { tokens: vec![0, 1], experts: vec![0, 3] },
                TokenPlan { tokens: vec![2, 4], experts: vec![0, 3] }
            ]
        );
        let rows: Vec<usize> = requests.iter().map(PlannedRequest::rows).collect();
        assert_eq!(rows, [2, 2], "six assignments, four distinct tokens");
        let assignments: Vec<usize> = requests.iter().map(PlannedRequest::assignments).collect();
        assert_eq!(assignments, [3, 3], "(token, expert) pairs the worker computes: 1 + 2, then 2 + 1");
        let first = requests[0].request.tokens.as_ref().expect("token rows");
        assert_eq!(first.layer, 7);
        assert_eq!(le_u32(&first.offsets), [0, 1, 3], "token 0 chose one expert here, token 1 two");
        assert_eq!(le_u32(&first.experts), [0, 0, 3]);
        let weights: Vec<f32> = le_words(&first.weights).map(f32::from_le_bytes).collect();
        assert_eq!(weights, [0.5, 0.25, 0.125]);
        let data = &first.rows.as_ref().expect("rows").data;
        let values: Vec<f32> = le_words(data).map(f32::from_le_bytes).collect();
        assert_eq!(values, [0.0, 1.0, 2.0, 3.0], "rows of tokens 0 and 1");
        let second = requests[1].request.tokens.as_ref().expect("token rows");
        assert_eq!(le_u32(&second.offsets), [0, 2, 3], "offsets count from the request's own first choice");
        assert_eq!(le_u32(&second.experts), [0, 3, 3]);
        assert_eq!(requests[1].payload_bytes(), 16);
    }

    #[test]
    fn a_large_payload_is_spread_over_the_stripes_in_shares_of_at_least_four_mebibytes() {
        let hidden = vec![0.0f32; 4];
        // 1 KiB rows (256 x f32).
        let call = CallRows { stripes: 3, ..f32_call(&hidden, 256, 64 << 20) };
        assert!(call.rows_per_request(8191) >= 8191, "below 8 MiB: one request");
        assert_eq!(call.rows_per_request(8192), 4096, "8 MiB: two shares of 4 MiB");
        assert_eq!(call.rows_per_request(3 * 4096), 4096, "12 MiB: three");
        assert_eq!(call.rows_per_request(64 * 1024), 21846, "64 MiB: every connection");
        assert!(CallRows { stripes: 1, ..call }.rows_per_request(16384) >= 16384, "one connection: one request");
        let split = CallRows { split_bytes: 100 << 10, ..call };
        assert_eq!(split.rows_per_request(16384), 100, "the split limit still holds");
    }

    /// A chunked stripe is cut into equal chunks of at most about 4 MiB, also when one connection
    /// carries all of a worker's rows: 6 MiB go as two of 3 MiB, not as 4 MiB and the 2 MiB left.
    #[test]
    fn one_stripe_is_chunked_into_equal_chunks() {
        let hidden = vec![0.0f32; 4];
        // 1 KiB rows (256 x f32).
        let call = CallRows { stripes: 1, chunked: true, ..f32_call(&hidden, 256, 64 << 20) };
        assert_eq!(call.rows_per_request(6 * 1024), 3 * 1024);
        assert_eq!(call.rows_per_request(9 * 1024), 3 * 1024, "9 MiB: three of 3 MiB");
        assert_eq!(call.rows_per_request(4 * 1024), 4 * 1024, "4 MiB: one chunk");
        assert_eq!(CallRows { chunked: false, ..call }.rows_per_request(6 * 1024), 6 * 1024, "unchunked: whole");
    }

    /// A piece from the middle of a group (what a failed request carried) stripes by its own
    /// rows: 7000 of 1 KiB are under two stripes' worth, so they go as one request.
    #[test]
    fn a_piece_from_the_middle_of_a_group_stripes_by_its_own_rows() {
        let hidden = vec![0.5f32; 21_000 * 256];
        let call = CallRows { stripes: 8, ..f32_call(&hidden, 256, 64 << 20) };
        let pieces = [Piece { group: 0, start: 14_000, end: 21_000 }];
        let requests = pack_pieces(&Arc::from("w"), &pieces, &[group(0, 21_000)], call);
        assert_eq!(requests.iter().map(PlannedRequest::rows).collect::<Vec<_>>(), [7000]);
    }

    /// How 20 MiB of 1 KiB rows (256 x f32) to one worker over 2 connections is packed: each
    /// request's stream and rows.
    fn layout_of_twenty_mib(split_bytes: usize, chunked: bool, threads: usize) -> Vec<(usize, usize)> {
        let rows = 20 * 1024;
        let hidden = vec![0.5f32; rows * 256];
        let call = CallRows { stripes: 2, chunked, threads, ..f32_call(&hidden, 256, split_bytes) };
        let choices: Vec<(u32, u32, f32)> = (0..rows as u32).map(|token| (token, token % 8, 1.0)).collect();
        let requests = pack_token_choices(&Arc::from("w"), choices, call);
        requests.iter().map(|planned| (planned.stream, planned.rows())).collect()
    }

    /// 12 MB of f32 rows (1 KiB each), row `t` holding `t` and its column: each row tells whose it is.
    fn numbered_rows(rows: usize) -> Vec<f32> {
        (0..rows * 256).map(|value| (value / 256) as f32 + (value % 256) as f32 / 256.0).collect()
    }

    fn rows_of(hidden: &[f32], tokens: &[u32]) -> Vec<f32> {
        tokens.iter().flat_map(|&token| hidden[token as usize * 256..][..256].iter().copied()).collect()
    }

    fn decoded(rows: Option<&v1::WireTensor>) -> Vec<f32> {
        rows.map_or_else(Vec::new, |rows| wire::decode_f32(&rows.data, WireDtype::F32))
    }

    /// The call's rows, gathered over several threads for all of a worker's requests together,
    /// land each in its own batch: expert-major batches hold their pieces' tokens' rows.
    #[test]
    fn expert_major_batches_carry_their_own_tokens_rows() {
        let rows = 12 * 1024;
        let hidden = numbered_rows(rows);
        let reversed = ExpertAssignments { tokens: (0..rows as u32).rev().step_by(3).collect(), ..group(1, 0) };
        let groups = [group(0, rows), reversed];
        let call = CallRows { threads: 4, ..f32_call(&hidden, 256, 1 << 20) };
        let requests = pack_pieces(&Arc::from("w"), &whole(&groups), &groups, call);
        assert!(requests.len() > 10, "{} requests", requests.len());
        for planned in &requests {
            for (piece, batch) in planned.pieces.iter().zip(&planned.request.batches) {
                let tokens = &groups[piece.group].tokens[piece.start..piece.end];
                assert_eq!(decoded(batch.rows.as_ref()), rows_of(&hidden, tokens));
            }
        }
    }

    /// Token-major requests hold their own tokens' rows, in their order.
    #[test]
    fn token_major_requests_carry_their_own_tokens_rows() {
        let rows = 12 * 1024;
        let hidden = numbered_rows(rows);
        let choices: Vec<(u32, u32, f32)> = (0..rows as u32).map(|token| (token, token % 8, 1.0)).collect();
        let call = CallRows { threads: 4, ..f32_call(&hidden, 256, 1 << 20) };
        let requests = pack_token_choices(&Arc::from("w"), choices, call);
        assert!(requests.len() > 10, "{} requests", requests.len());
        for planned in &requests {
            let tokens = &planned.token_major.as_ref().expect("token-major").tokens;
            let sent = planned.request.tokens.as_ref().and_then(|rows| rows.rows.as_ref());
            assert_eq!(decoded(sent), rows_of(&hidden, tokens));
        }
    }

    #[test]
    fn a_large_stripe_goes_as_equal_chunks_of_one_stream() {
        // In 4 MiB chunks.
        assert_eq!(
            layout_of_twenty_mib(64 << 20, true, 2),
            [(0, 3414), (1, 3414), (0, 3414), (1, 3414), (0, 3414), (1, 3410)],
            "two streams taking equal chunks in turn"
        );
        assert_eq!(
            layout_of_twenty_mib(64 << 20, false, 2),
            [(0, 10240), (1, 10240)],
            "unchunked: one request per stripe"
        );
    }

    #[test]
    fn unchunked_requests_beyond_the_stripes_are_each_a_call_of_their_own() {
        // At most 5 MiB a request.
        assert_eq!(
            layout_of_twenty_mib(5 << 20, false, 1),
            [(0, 5120), (1, 5120), (2, 5120), (3, 5120)],
            "four unary calls, not two streams of two"
        );
    }

    /// A token-major request to a that failed: its (token, expert, weight) choices go again, each
    /// to the holder of its expert that is left, one request per holder, with the same rows and
    /// weights; an expert that only a held cannot be carried anywhere.
    #[test]
    fn a_failed_token_major_request_is_carried_again_by_the_other_holders_of_its_experts() {
        let replicas = crate::replicas::Replicas::default();
        let holders = table(|expert| match expert {
            0 => vec!["a", "b"],
            1 => vec!["a", "c"],
            _ => vec!["a"],
        });
        let groups = [
            ExpertAssignments { expert: 0, tokens: vec![0, 2], weights: vec![0.5, 0.25], slots: None },
            ExpertAssignments { expert: 1, tokens: vec![0, 1], weights: vec![0.5, 0.75], slots: None },
        ];
        let hidden: Vec<f32> = (0..3 * 2).map(|value| value as f32).collect();
        let call = f32_call(&hidden, 2, 1 << 20);
        let failed = pack_token_rows(&Arc::from("a"), &whole(&groups), &groups, call);
        assert_eq!(failed.len(), 1);
        let carried = carried_choices(&failed[0], &groups).expect("token rows");
        assert_eq!(carried, [(0, 0, 0.5), (0, 1, 0.5), (1, 1, 0.75), (2, 0, 0.25)]);

        let without_a = std::collections::HashSet::from([Endpoint::from("a")]);
        let mut choice = replicas.choice(0, without_a.clone());
        let again = reroute(&[&failed[0]], &groups, &holders, &mut choice, call).expect("b and c hold them");
        assert!(again.iter().all(|planned| planned.request.request_id == call.request_id), "the call's id");
        let sent: Vec<_> = again
            .iter()
            .map(|planned| {
                let rows = &planned.request.tokens.as_ref().expect("token-major").rows.as_ref().expect("rows").data;
                let values = le_words(rows).map(f32::from_le_bytes).collect();
                let plan = planned.token_major.clone().expect("token-major");
                (&*planned.endpoint, plan, carried_choices(planned, &groups).expect("token rows"), values)
            })
            .collect();
        assert_eq!(
            sent,
            [
                (
                    "b",
                    TokenPlan { tokens: vec![0, 2], experts: vec![0] },
                    vec![(0, 0, 0.5), (2, 0, 0.25)],
                    vec![0.0, 1.0, 4.0, 5.0]
                ),
                (
                    "c",
                    TokenPlan { tokens: vec![0, 1], experts: vec![1] },
                    vec![(0, 1, 0.5), (1, 1, 0.75)],
                    vec![0.0, 1.0, 2.0, 3.0]
                ),
            ]
        );

        let only_on_a = [ExpertAssignments { expert: 2, tokens: vec![1], weights: vec![1.0], slots: None }];
        let failed = pack_token_rows(&Arc::from("a"), &whole(&only_on_a), &only_on_a, call);
        let mut choice = replicas.choice(0, without_a);
        let unplaced = reroute(&[&failed[0]], &only_on_a, &holders, &mut choice, call).unwrap_err();
        assert!(
            matches!(unplaced, ClientError::Unplaced { expert, .. } if expert == ExpertId::new(0, 2)),
            "{unplaced:?}"
        );
    }

    /// An expert-major request that failed: its pieces go again whole to the holders left, as the
    /// same token rows; Soft MoE's slot rows are no token's choices.
    #[test]
    fn a_failed_expert_major_request_is_carried_again_as_its_pieces() {
        let replicas = crate::replicas::Replicas::default();
        let holders = table(|expert| if expert == 0 { vec!["a", "b"] } else { vec!["a"] });
        let groups = [
            ExpertAssignments { expert: 0, tokens: vec![1, 3, 4], weights: vec![0.5, 0.25, 1.0], slots: None },
            ExpertAssignments { expert: 1, tokens: vec![2], weights: vec![1.0], slots: None },
        ];
        let hidden = vec![0.5f32; 5 * 2];
        let call = f32_call(&hidden, 2, 1 << 20);
        let failed = pack_pieces(&Arc::from("a"), &[Piece { group: 0, start: 1, end: 3 }], &groups, call);
        assert_eq!(carried_choices(&failed[0], &groups), Some(vec![(3, 0, 0.25), (4, 0, 1.0)]));

        let without_a = std::collections::HashSet::from([Endpoint::from("a")]);
        let again = reroute(&[&failed[0]], &groups, &holders, &mut replicas.choice(0, without_a.clone()), call)
            .expect("b holds expert 0");
        let sent: Vec<(&str, Vec<Piece>)> =
            again.iter().map(|planned| (&*planned.endpoint, planned.pieces.clone())).collect();
        assert_eq!(sent, [("b", vec![Piece { group: 0, start: 1, end: 3 }])]);

        let failed = pack_pieces(&Arc::from("a"), &whole(&groups[1..]), &groups[1..], call);
        let unplaced = reroute(&[&failed[0]], &groups[1..], &holders, &mut replicas.choice(0, without_a), call);
        assert!(matches!(unplaced, Err(ClientError::Unplaced { expert, .. }) if expert == ExpertId::new(0, 1)));

        let inputs = vec![0.5f32; 2 * 2];
        let slots = [ExpertAssignments {
            expert: 0,
            tokens: Vec::new(),
            weights: Vec::new(),
            slots: Some(crate::router::SlotRows { first_slot: 0, inputs }),
        }];
        let failed = pack_pieces(&Arc::from("a"), &[Piece { group: 0, start: 0, end: 2 }], &slots, call);
        assert_eq!(carried_choices(&failed[0], &slots), None, "slot rows");
    }
}
