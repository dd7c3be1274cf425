//! The communication ledger: where every byte and microsecond of each (client → worker) hop went.
//!
//! [`WorkerCall`] is one worker's share of one layer call; [`CommLedger`] sums them per
//! (layer, worker) over many calls and keeps the straggler view: which worker the call waited for,
//! and by how much it trailed the next slowest.
//!
//! Dispatch is the time from the client handing a request to gRPC until the worker's handler has
//! it (protobuf encode, HTTP/2 transfer, decode); combine-transfer is the way back, from the
//! worker's reply until the client holds the decoded message. Both come from wall clocks on two
//! processes, so they are exact on one host and as good as the clock sync across hosts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_proto::v1;

use crate::timing::{ByteCounts, GRPC_FRAME_PREFIX};

/// One RPC as the client timed it.
#[derive(Debug, Clone, Copy)]
pub struct RpcTiming {
    pub elapsed: Duration,
    pub sent_unix_nanos: u64,
    pub answered_unix_nanos: u64,
}

/// One worker's share of one layer call (summed over its requests when the payload was split).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkerCall {
    pub endpoint: Arc<str>,
    pub requests: usize,
    pub rows: usize,
    pub bytes: ByteCounts,
    /// Client CPU time gathering and converting this worker's rows.
    pub encode: Duration,
    /// Client CPU time converting this worker's answers to f32.
    pub decode: Duration,
    /// Client time adding this worker's answers into the output.
    pub combine: Duration,
    /// The slowest of this worker's RPCs, as the client saw it.
    pub rpc: Duration,
    /// The worker's handler time (its answer's `worker_us`), slowest request.
    pub worker: Duration,
    /// Request transfer: client send → worker handler (slowest request).
    pub dispatch: Duration,
    /// Answer transfer: worker reply → client has it (slowest request).
    pub combine_transfer: Duration,
    /// The ends of all its requests' and answers' transfers together (see
    /// [`WorkerCall::dispatch_span`]), as Unix nanoseconds (0: none yet).
    spans: TransferEnds,
    /// Handler time not spent computing (queue wait, batching), slowest request.
    pub queue_wait: Duration,
    /// Expert compute of this worker's batches, summed: each batch's time in proportion to this
    /// call's rows in it.
    pub compute: Duration,
}

/// The earliest start and latest end of a worker's request and answer transfers in one call.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct TransferEnds {
    first_sent: u64,
    last_received: u64,
    first_replied: u64,
    last_answered: u64,
}

impl TransferEnds {
    fn widen(&mut self, sent: u64, received: u64, replied: u64, answered: u64) {
        let earliest = |current: u64, new: u64| if current == 0 { new } else { current.min(new) };
        self.first_sent = earliest(self.first_sent, sent);
        self.last_received = self.last_received.max(received);
        self.first_replied = earliest(self.first_replied, replied);
        self.last_answered = self.last_answered.max(answered);
    }
}

/// The time from one Unix-nanosecond stamp to another; zero when either is missing (0).
fn gap(from: u64, to: u64) -> Duration {
    match (from, to) {
        (0, _) | (_, 0) => Duration::ZERO,
        (from, to) => Duration::from_nanos(to.saturating_sub(from)),
    }
}

impl WorkerCall {
    pub fn new(endpoint: Arc<str>) -> Self {
        Self { endpoint, ..Self::default() }
    }

    /// Every request's transfer together: the first sent → the last in the worker's handler. What
    /// a link's rate bounds when one worker's requests share its link.
    pub fn dispatch_span(&self) -> Duration {
        gap(self.spans.first_sent, self.spans.last_received)
    }

    /// Every answer's transfer together: the worker's first reply → the client has the last one.
    pub fn combine_span(&self) -> Duration {
        gap(self.spans.first_replied, self.spans.last_answered)
    }

    /// Adds one answered request of this worker.
    pub fn record_answer(&mut self, response: &v1::ForwardResponse, rpc: &RpcTiming) {
        use prost::Message;
        self.bytes.message_received += response.encoded_len() as u64 + GRPC_FRAME_PREFIX;
        self.rpc = self.rpc.max(rpc.elapsed);
        self.worker = self.worker.max(Duration::from_micros(response.worker_us));
        self.dispatch = self.dispatch.max(gap(rpc.sent_unix_nanos, response.received_unix_nanos));
        self.combine_transfer = self.combine_transfer.max(gap(response.replied_unix_nanos, rpc.answered_unix_nanos));
        if [rpc.sent_unix_nanos, response.received_unix_nanos, response.replied_unix_nanos, rpc.answered_unix_nanos]
            .iter()
            .all(|stamp| *stamp != 0)
        {
            self.spans.widen(
                rpc.sent_unix_nanos,
                response.received_unix_nanos,
                response.replied_unix_nanos,
                rpc.answered_unix_nanos,
            );
        }
        let waited_for = response_compute(response);
        self.queue_wait = self.queue_wait.max(Duration::from_micros(response.worker_us).saturating_sub(waited_for));
        self.compute += response_compute_share(response);
    }
}

/// The expert compute one answer waited for: the time of every expert batch its rows were in
/// (saturating: the figures are the worker's, and need not add up).
pub fn response_compute(response: &v1::ForwardResponse) -> Duration {
    let micros = response.outputs.iter().filter_map(|output| output.timing.map(|t| t.compute_us));
    Duration::from_micros(micros.fold(0, u64::saturating_add))
}

/// The expert compute one answer accounts for: each of its batches' time in proportion to its rows
/// there, so that requests merged into the same batches (a split payload's, or other callers') add
/// up to the batches' time instead of each counting all of it.
pub fn response_compute_share(response: &v1::ForwardResponse) -> Duration {
    let share = |timing: v1::ExpertTiming| {
        let whole = Duration::from_micros(timing.compute_us);
        if timing.tokens == 0 || timing.batch_tokens == 0 {
            return whole;
        }
        whole.mul_f64(f64::from(timing.tokens.min(timing.batch_tokens)) / f64::from(timing.batch_tokens))
    };
    response.outputs.iter().filter_map(|output| output.timing).map(share).fold(Duration::ZERO, Duration::saturating_add)
}

/// Splits `total` over `shares` in proportion to their weights (equally when every weight is 0),
/// in whole bytes that add up to `total`: the last share takes the rounding.
fn apportion<'a>(total: u64, shares: impl Iterator<Item = (u64, &'a mut u64)>) {
    let shares: Vec<(u64, &mut u64)> = shares.collect();
    let weight_total: u64 = shares.iter().map(|(weight, _)| weight).sum();
    let count = shares.len() as u64;
    let mut given = 0;
    for (index, (weight, out)) in shares.into_iter().enumerate() {
        *out = if index as u64 + 1 == count {
            total - given
        } else if weight_total == 0 {
            total / count
        } else {
            (u128::from(total) * u128::from(weight) / u128::from(weight_total)) as u64
        };
        given += *out;
    }
}

/// Sums of one (layer, worker) pair over many calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairTotals {
    pub calls: u64,
    pub requests: u64,
    pub rows: u64,
    pub bytes: ByteCounts,
    /// Bytes its connection wrote and read on the socket (framing included), when known.
    pub socket_sent: u64,
    pub socket_received: u64,
    pub encode: Duration,
    pub decode: Duration,
    pub combine: Duration,
    pub rpc: Duration,
    pub dispatch: Duration,
    pub combine_transfer: Duration,
    pub queue_wait: Duration,
    pub compute: Duration,
    /// Calls that waited for this worker last.
    pub straggler_calls: u64,
    /// Summed time by which this worker trailed the next slowest, over the calls it was the straggler.
    pub straggler_margin: Duration,
}

impl PairTotals {
    fn absorb(&mut self, later: &PairTotals) {
        self.calls += later.calls;
        self.requests += later.requests;
        self.rows += later.rows;
        self.bytes += later.bytes;
        self.socket_sent += later.socket_sent;
        self.socket_received += later.socket_received;
        self.encode += later.encode;
        self.decode += later.decode;
        self.combine += later.combine;
        self.rpc += later.rpc;
        self.dispatch += later.dispatch;
        self.combine_transfer += later.combine_transfer;
        self.queue_wait += later.queue_wait;
        self.compute += later.compute;
        self.straggler_calls += later.straggler_calls;
        self.straggler_margin += later.straggler_margin;
    }

    fn add(&mut self, call: &WorkerCall) {
        self.calls += 1;
        self.requests += call.requests as u64;
        self.rows += call.rows as u64;
        self.bytes += call.bytes;
        self.encode += call.encode;
        self.decode += call.decode;
        self.combine += call.combine;
        self.rpc += call.rpc;
        self.dispatch += call.dispatch;
        self.combine_transfer += call.combine_transfer;
        self.queue_wait += call.queue_wait;
        self.compute += call.compute;
    }
}

/// A pair's totals divided by its calls: whole bytes and microseconds per call.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PairMeans {
    #[serde(rename = "requests_per_call")]
    pub requests: f64,
    #[serde(rename = "rows_per_call")]
    pub rows: f64,
    #[serde(rename = "payload_bytes_sent_per_call")]
    pub payload_sent: u64,
    #[serde(rename = "payload_bytes_received_per_call")]
    pub payload_received: u64,
    #[serde(rename = "message_bytes_sent_per_call")]
    pub message_sent: u64,
    #[serde(rename = "message_bytes_received_per_call")]
    pub message_received: u64,
    #[serde(rename = "socket_bytes_sent_per_call")]
    pub socket_sent: u64,
    #[serde(rename = "socket_bytes_received_per_call")]
    pub socket_received: u64,
    pub encode_us: f64,
    pub decode_us: f64,
    pub combine_us: f64,
    pub rpc_us: f64,
    pub dispatch_us: f64,
    pub combine_transfer_us: f64,
    pub queue_wait_us: f64,
    pub compute_us: f64,
    /// Mean lead over the next slowest worker, over the calls this one was the straggler.
    #[serde(rename = "straggler_margin_mean_us")]
    pub straggler_margin_us: f64,
}

/// One (layer, worker) pair of a ledger, as reports show it: per-call means.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LedgerRow {
    pub layer: u32,
    pub worker: String,
    pub calls: u64,
    /// Calls that waited for this worker last.
    pub straggler_calls: u64,
    #[serde(flatten)]
    pub means: PairMeans,
}

impl PairTotals {
    pub fn per_call(&self) -> PairMeans {
        let calls = self.calls.max(1);
        let us = |total: Duration| total.as_secs_f64() * 1e6 / calls as f64;
        PairMeans {
            requests: self.requests as f64 / calls as f64,
            rows: self.rows as f64 / calls as f64,
            payload_sent: self.bytes.payload_sent / calls,
            payload_received: self.bytes.payload_received / calls,
            message_sent: self.bytes.message_sent / calls,
            message_received: self.bytes.message_received / calls,
            socket_sent: self.socket_sent / calls,
            socket_received: self.socket_received / calls,
            encode_us: us(self.encode),
            decode_us: us(self.decode),
            combine_us: us(self.combine),
            rpc_us: us(self.rpc),
            dispatch_us: us(self.dispatch),
            combine_transfer_us: us(self.combine_transfer),
            queue_wait_us: us(self.queue_wait),
            compute_us: us(self.compute),
            straggler_margin_us: self.straggler_margin.as_secs_f64() * 1e6 / self.straggler_calls.max(1) as f64,
        }
    }
}

/// Per (layer, worker) totals of many calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommLedger {
    pub pairs: BTreeMap<(u32, String), PairTotals>,
}

impl CommLedger {
    /// Adds another ledger's sums (a later window of the same calls' kind), pair by pair.
    pub fn absorb(&mut self, later: CommLedger) {
        for (key, pair) in later.pairs {
            self.pairs.entry(key).or_default().absorb(&pair);
        }
    }

    /// Adds one layer call's worker shares, and marks its straggler.
    pub fn record(&mut self, layer: u32, calls: &[WorkerCall]) {
        for call in calls {
            self.pairs.entry((layer, call.endpoint.to_string())).or_default().add(call);
        }
        // The slowest worker and the next slowest RPC, in one pass.
        let mut slowest: Option<&WorkerCall> = None;
        let mut runner_up = Duration::ZERO;
        for call in calls {
            match slowest {
                Some(current) if call.rpc <= current.rpc => runner_up = runner_up.max(call.rpc),
                _ => {
                    runner_up = slowest.map_or(runner_up, |previous| previous.rpc.max(runner_up));
                    slowest = Some(call);
                }
            }
        }
        if let Some(slowest) = slowest {
            let pair = self.pairs.entry((layer, slowest.endpoint.to_string())).or_default();
            pair.straggler_calls += 1;
            pair.straggler_margin += slowest.rpc.saturating_sub(runner_up);
        }
    }

    /// Sets the socket byte counts of `endpoint`'s connections (deltas over the measured window).
    /// The counters are per connection, not per layer: a worker that served several layers (a
    /// whole-model step) has them split over its pairs in proportion to each pair's encoded
    /// message bytes, so framing is shared out as the messages that caused it; with one layer
    /// (or none recorded: `fallback_layer`) the pair gets them whole.
    pub fn set_socket_bytes(&mut self, fallback_layer: u32, endpoint: &str, sent: u64, received: u64) {
        let mut pairs: Vec<&mut PairTotals> =
            self.pairs.iter_mut().filter(|((_, worker), _)| worker == endpoint).map(|(_, pair)| pair).collect();
        if pairs.len() <= 1 {
            let pair = match pairs.pop() {
                Some(pair) => pair,
                None => self.pairs.entry((fallback_layer, endpoint.to_owned())).or_default(),
            };
            pair.socket_sent = sent;
            pair.socket_received = received;
            return;
        }
        apportion(sent, pairs.iter_mut().map(|pair| (pair.bytes.message_sent, &mut pair.socket_sent)));
        apportion(received, pairs.iter_mut().map(|pair| (pair.bytes.message_received, &mut pair.socket_received)));
    }

    /// Every pair with its per-call means, in (layer, worker) order.
    pub fn rows(&self) -> Vec<LedgerRow> {
        self.pairs
            .iter()
            .map(|((layer, worker), pair)| LedgerRow {
                layer: *layer,
                worker: worker.clone(),
                calls: pair.calls,
                straggler_calls: pair.straggler_calls,
                means: pair.per_call(),
            })
            .collect()
    }

    /// Rows each worker computed, summed over layers.
    pub fn rows_by_worker(&self) -> BTreeMap<String, u64> {
        let mut rows = BTreeMap::new();
        for ((_, endpoint), pair) in &self.pairs {
            *rows.entry(endpoint.clone()).or_default() += pair.rows;
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(endpoint: &str, rpc_ms: u64, rows: usize) -> WorkerCall {
        WorkerCall {
            endpoint: Arc::from(endpoint),
            requests: 1,
            rows,
            rpc: Duration::from_millis(rpc_ms),
            dispatch: Duration::from_millis(1),
            ..WorkerCall::default()
        }
    }

    /// Two requests of one worker whose rows were merged into the same expert batch: each waited
    /// for the whole batch, and together they account for it once.
    #[test]
    fn requests_merged_into_one_batch_share_its_compute() {
        let answer = |tokens: u32| v1::ForwardResponse {
            outputs: vec![v1::ExpertOutput {
                timing: Some(v1::ExpertTiming { queue_wait_us: 0, compute_us: 9000, batch_tokens: 12, tokens }),
                ..Default::default()
            }],
            worker_us: 10_000,
            ..Default::default()
        };
        let rpc = RpcTiming { elapsed: Duration::from_millis(12), sent_unix_nanos: 0, answered_unix_nanos: 0 };
        let mut call = WorkerCall::default();
        call.record_answer(&answer(4), &rpc);
        call.record_answer(&answer(8), &rpc);
        assert_eq!(call.compute, Duration::from_millis(9), "3 ms and 6 ms of the 9 ms batch");
        assert_eq!(call.queue_wait, Duration::from_millis(1), "each waited for the whole batch");
        assert_eq!(response_compute(&answer(4)), Duration::from_millis(9));
        let from_an_older_worker = answer(0);
        assert_eq!(response_compute_share(&from_an_older_worker), Duration::from_millis(9), "no rows sent: all of it");
        let mut absurd = answer(0);
        absurd.outputs = vec![absurd.outputs[0].clone(); 3];
        absurd.outputs.iter_mut().for_each(|output| output.timing.as_mut().unwrap().compute_us = u64::MAX);
        assert_eq!(response_compute(&absurd), Duration::from_micros(u64::MAX), "a worker's figures saturate");
    }

    /// A worker's share of a call with every field its own value, scaled by `scale`.
    fn full_call(scale: u32) -> WorkerCall {
        let (n, us) = (u64::from(scale), |micros: u32| Duration::from_micros(u64::from(micros * scale)));
        WorkerCall {
            endpoint: Arc::from("a"),
            requests: 2 * scale as usize,
            rows: 3 * scale as usize,
            bytes: ByteCounts {
                payload_sent: 400 * n,
                payload_received: 300 * n,
                message_sent: 410 * n,
                message_received: 310 * n,
            },
            encode: us(5),
            decode: us(6),
            combine: us(7),
            rpc: us(100),
            dispatch: us(20),
            combine_transfer: us(30),
            queue_wait: us(8),
            compute: us(9),
            ..WorkerCall::default()
        }
    }

    /// Each field of a pair is the sum of its calls' (also once a later ledger is absorbed), and
    /// its per-call mean that sum over the calls.
    #[test]
    fn every_field_of_a_pair_sums_over_its_calls_and_averages_per_call() {
        let mut ledger = CommLedger::default();
        ledger.record(0, &[full_call(1)]);
        let mut later = CommLedger::default();
        later.record(0, &[full_call(2)]);
        later.record(0, &[full_call(3)]);
        ledger.absorb(later);
        let mut want = PairTotals {
            calls: 3,
            straggler_calls: 3,
            straggler_margin: Duration::from_micros(600),
            ..Default::default()
        };
        for scale in 1..=3 {
            let call = full_call(scale);
            want.requests += call.requests as u64;
            want.rows += call.rows as u64;
            want.bytes += call.bytes;
            (want.encode, want.decode, want.combine) =
                (want.encode + call.encode, want.decode + call.decode, want.combine + call.combine);
            (want.rpc, want.dispatch) = (want.rpc + call.rpc, want.dispatch + call.dispatch);
            want.combine_transfer += call.combine_transfer;
            (want.queue_wait, want.compute) = (want.queue_wait + call.queue_wait, want.compute + call.compute);
        }
        let pair = &ledger.pairs[&(0, "a".to_owned())];
        assert_eq!(pair, &want);
        assert_eq!((pair.requests, pair.rows), (12, 18));
        let bytes =
            ByteCounts { payload_sent: 2400, payload_received: 1800, message_sent: 2460, message_received: 1860 };
        assert_eq!(pair.bytes, bytes);
        assert_eq!(
            pair.per_call(),
            PairMeans {
                requests: 4.0,
                rows: 6.0,
                payload_sent: 800,
                payload_received: 600,
                message_sent: 820,
                message_received: 620,
                socket_sent: 0,
                socket_received: 0,
                encode_us: 10.0,
                decode_us: 12.0,
                combine_us: 14.0,
                rpc_us: 200.0,
                dispatch_us: 40.0,
                combine_transfer_us: 60.0,
                queue_wait_us: 16.0,
                compute_us: 18.0,
                straggler_margin_us: 200.0,
            }
        );
        let mut socket = ledger.clone();
        socket.set_socket_bytes(0, "a", 3000, 1500);
        let means = socket.rows()[0].means;
        assert_eq!((means.socket_sent, means.socket_received), (1000, 500));
        assert_eq!(PairTotals::default().per_call(), PairMeans::default(), "no calls: zeros, not a division by zero");
    }

    /// Each answer adds its encoded size; the dispatch and combine spans run from the earliest
    /// start to the latest end over the worker's requests, leaving out an answer missing a stamp.
    #[test]
    fn answers_add_their_bytes_and_widen_the_transfer_spans() {
        let stamps = |sent: u64, received: u64, replied: u64, answered: u64| {
            let response = v1::ForwardResponse {
                received_unix_nanos: received,
                replied_unix_nanos: replied,
                worker_us: 1,
                ..Default::default()
            };
            let rpc =
                RpcTiming { elapsed: Duration::from_micros(9), sent_unix_nanos: sent, answered_unix_nanos: answered };
            (response, rpc)
        };
        let (mut call, mut messages) = (WorkerCall::default(), 0);
        for (sent, received, replied, answered) in
            [(1_000, 5_000, 9_000, 12_000), (2_000, 7_000, 8_000, 10_000), (0, 99_000, 99_500, 99_900)]
        {
            let (response, rpc) = stamps(sent, received, replied, answered);
            call.record_answer(&response, &rpc);
            messages += prost::Message::encoded_len(&response) as u64 + GRPC_FRAME_PREFIX;
        }
        assert_eq!(call.bytes.message_received, messages, "each answer adds its encoded size and gRPC's prefix");
        assert_eq!(call.dispatch_span(), Duration::from_nanos(6_000), "1 µs sent → 7 µs received");
        assert_eq!(call.combine_span(), Duration::from_nanos(4_000), "8 µs replied → 12 µs answered");
        assert_eq!(call.dispatch, Duration::from_nanos(5_000), "the slowest request's own transfer");
        assert_eq!(call.combine_transfer, Duration::from_nanos(3_000));
        assert_eq!(WorkerCall::default().dispatch_span(), Duration::ZERO, "no answer, no span");
    }

    #[test]
    fn the_straggler_is_the_slowest_worker_and_its_margin_is_over_the_runner_up() {
        let mut ledger = CommLedger::default();
        ledger.record(0, &[call("a", 10, 4), call("b", 4, 2), call("c", 7, 1)]);
        ledger.record(0, &[call("a", 5, 4), call("b", 9, 2), call("c", 7, 1)]);
        let a = &ledger.pairs[&(0, "a".to_owned())];
        let b = &ledger.pairs[&(0, "b".to_owned())];
        let c = &ledger.pairs[&(0, "c".to_owned())];
        assert_eq!((a.straggler_calls, a.straggler_margin), (1, Duration::from_millis(3)));
        assert_eq!((b.straggler_calls, b.straggler_margin), (1, Duration::from_millis(2)));
        assert_eq!(c.straggler_calls, 0);
        assert_eq!((a.calls, a.rows, a.rpc, a.dispatch), (2, 8, Duration::from_millis(15), Duration::from_millis(2)));
    }

    #[test]
    fn a_ledger_absorbs_a_later_one_pair_by_pair() {
        let mut first = CommLedger::default();
        first.record(0, &[call("a", 10, 4), call("b", 4, 2)]);
        first.set_socket_bytes(0, "a", 100, 50);
        let mut later = CommLedger::default();
        later.record(0, &[call("a", 3, 4), call("b", 9, 2)]);
        later.record(1, &[call("c", 1, 1)]);
        later.set_socket_bytes(0, "a", 30, 20);
        first.absorb(later);
        let a = &first.pairs[&(0, "a".to_owned())];
        assert_eq!((a.calls, a.rows, a.rpc, a.straggler_calls), (2, 8, Duration::from_millis(13), 1));
        assert_eq!((a.socket_sent, a.socket_received), (130, 70));
        assert_eq!(first.pairs[&(0, "b".to_owned())].straggler_calls, 1);
        assert_eq!(first.pairs[&(1, "c".to_owned())].calls, 1, "a pair only the later one had");
    }

    #[test]
    fn a_workers_socket_bytes_are_shared_over_its_layers_by_message_bytes() {
        let mut ledger = CommLedger::default();
        let with_messages = |sent: u64, received: u64| WorkerCall {
            bytes: ByteCounts { message_sent: sent, message_received: received, ..ByteCounts::default() },
            ..call("a", 1, 1)
        };
        ledger.record(0, &[with_messages(300, 100)]);
        ledger.record(1, &[with_messages(100, 100)]);
        ledger.record(1, &[call("b", 1, 1)]);
        ledger.set_socket_bytes(0, "a", 1001, 500);
        ledger.set_socket_bytes(0, "b", 70, 30);
        ledger.set_socket_bytes(0, "unseen", 5, 6);
        let mut silent = ledger.clone();
        silent.record(0, &[call("z", 1, 1)]);
        silent.record(1, &[call("z", 1, 1)]);
        silent.set_socket_bytes(0, "z", 100, 9);
        let z = |layer: u32| {
            (silent.pairs[&(layer, "z".to_owned())].socket_sent, silent.pairs[&(layer, "z".to_owned())].socket_received)
        };
        assert_eq!((z(0), z(1)), ((50, 4), (50, 5)), "no message bytes to weigh by: equal shares");
        let socket = |layer: u32, worker: &str| {
            let pair = &ledger.pairs[&(layer, worker.to_owned())];
            (pair.socket_sent, pair.socket_received)
        };
        assert_eq!(socket(0, "a"), (750, 250), "three quarters of what a sent, half of what it received");
        assert_eq!(socket(1, "a"), (251, 250), "the rest, rounding included");
        assert_eq!(socket(1, "b"), (70, 30), "a worker of one layer has them whole");
        assert_eq!(socket(0, "unseen"), (5, 6), "a worker with no calls: the fallback layer");
        let rows: Vec<_> =
            ledger.rows().into_iter().map(|row| (row.layer, row.worker, row.means.socket_sent)).collect();
        assert_eq!(
            rows,
            [(0, "a".into(), 750), (0, "unseen".into(), 5), (1, "a".into(), 251), (1, "b".into(), 70)],
            "a row per pair, in (layer, worker) order"
        );
        let by_worker = BTreeMap::from([("a".to_owned(), 2), ("b".to_owned(), 1), ("unseen".to_owned(), 0)]);
        assert_eq!(ledger.rows_by_worker(), by_worker, "a's rows summed over its layers");
    }
}
