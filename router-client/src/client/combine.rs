//! A call's answers: each checked against what was asked and booked on the async task as it
//! arrives ([`Combine`]), then decoded and added into the output on the CPU pool ([`Sums`]) while
//! later answers are still on the wire ([`Collecting`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use switchyard_model::{ExpertId, TableVersion};
use switchyard_proto::v1;
use switchyard_proto::wire::WireDtype;

use super::LayerOutput;
use super::plan::{CallPlan, book_requests, worker_call_of};
use crate::codec::{add_rows_from, decode_rows};
use crate::cpu::{CpuPool, chunks_for};
use crate::dispatch::{PlannedRequest, TokenPlan};
use crate::error::ClientError;
use crate::ledger::{WorkerCall, response_compute};
use crate::lock;
use crate::router::{ExpertAssignments, RoutingSummary};
use crate::timing::{ByteCounts, TimeBreakdown};
use crate::transport::{Answer, Endpoint};

/// Where a call's answers go: each checked and booked on the async task as it arrives (a bad one
/// ends the call at once), then decoded and summed on the CPU pool while later answers are still
/// on the wire.
pub(super) struct Collecting {
    pub(super) combine: Combine,
    sums: Arc<Mutex<Sums>>,
    summing: Vec<BoxFuture<'static, Result<(), ClientError>>>,
}

impl Collecting {
    pub(super) fn new(plan: &CallPlan, values: usize) -> Self {
        Self { combine: Combine::new(plan), sums: Arc::new(Mutex::new(Sums::new(values))), summing: Vec::new() }
    }

    /// Checks `answer` to `round[index]` and starts summing it on `cpu`.
    pub(super) fn accept(
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
    pub(super) async fn summed(self, cpu: &CpuPool, values: usize) -> Result<(Combine, Sums), ClientError> {
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
pub(super) struct Combine {
    worker_calls: Vec<WorkerCall>,
    /// Per answered request: (RPC time, the worker's handler time, its compute), for the straggler.
    answered: Vec<(Duration, Duration, Duration)>,
}

impl Combine {
    pub(super) fn new(plan: &CallPlan) -> Self {
        Self { worker_calls: plan.worker_calls.clone(), answered: Vec::new() }
    }

    fn worker_call(&mut self, endpoint: &Endpoint) -> &mut WorkerCall {
        worker_call_of(&mut self.worker_calls, endpoint)
    }

    /// Books requests sent again, to other holders.
    pub(super) fn add_requests(&mut self, requests: &[PlannedRequest]) {
        book_requests(&mut self.worker_calls, requests);
    }

    /// Checks the answer to `planned` against what was asked, books it, and hands back the
    /// response for [`Sums::add`].
    pub(super) fn accept(
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

    pub(super) fn finish(
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
        (timing.decode, timing.combine) = in_proportion(summing_tail, decode, combine);
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

/// An answer's tensor bytes: the work of decoding and summing it, in [`CpuPool::run_sized`]'s
/// units (a byte counted as a value errs toward the pool).
fn answer_bytes(response: &v1::ForwardResponse) -> usize {
    let rows = response.outputs.iter().filter_map(|output| output.rows.as_ref());
    response.combined.iter().chain(rows).map(|tensor| tensor.data.len()).sum()
}

/// Rows of a token-major answer decoded at a time before they are added: a block small enough to
/// stay in cache between the two passes (224 KiB of f32 at DeepEP's 7168 values).
const COMBINE_BLOCK_ROWS: usize = 8;

/// A token-major answer of at least this many bytes per thread is summed by several threads at
/// once, each into its own range of the output. Small enough to split one stripe's answer
/// (DeepEP-normal over 8 connections: 7 MB each), as answers are summed one at a time.
const SPLIT_SUM_BYTES: usize = 1 << 20;

/// The threads worth summing a token-major answer of `bytes` bytes with, at most `threads`.
fn sum_threads(bytes: usize, threads: usize) -> usize {
    threads.min(bytes / SPLIT_SUM_BYTES).max(1)
}

/// A token-major answer's rows (or a run of them): one weighted sum per token, for `tokens` in
/// order.
#[derive(Clone, Copy)]
struct TokenRows<'a> {
    d_model: usize,
    dtype: WireDtype,
    tokens: &'a [u32],
    data: &'a [u8],
}

impl<'a> TokenRows<'a> {
    /// Decodes the rows and adds each into `output`, whose first row is token `first_token`'s,
    /// a block at a time; returns the time spent decoding and adding.
    fn add_into(&self, output: &mut [f32], first_token: u32, scratch: &mut Vec<f32>) -> (Duration, Duration) {
        let (mut decode, mut combine) = (Duration::ZERO, Duration::ZERO);
        let block_bytes = COMBINE_BLOCK_ROWS * self.dtype.row_bytes(self.d_model);
        let blocks = self.tokens.chunks(COMBINE_BLOCK_ROWS).zip(self.data.chunks(block_bytes.max(1)));
        for (block_tokens, block) in blocks {
            let phase = Instant::now();
            decode_rows(block, self.d_model, self.dtype, scratch);
            let decoded = Instant::now();
            let start = first_token as usize * self.d_model;
            add_rows_from(output, start, self.d_model, block_tokens, scratch);
            decode += decoded - phase;
            combine += decoded.elapsed();
        }
        (decode, combine)
    }

    /// Adds the rows into `output`, whose first row is token 0's: in runs that up to `threads`
    /// threads take in turns when the tokens allow it ([`TokenRows::runs`]), else on this thread;
    /// returns the time spent decoding and adding.
    fn sum_into(&self, output: &mut [f32], threads: usize, scratch: &mut Vec<f32>) -> (Duration, Duration) {
        match self.runs(output, threads) {
            Some(runs) => sum_in_turns(threads, runs),
            None => self.add_into(output, 0, scratch),
        }
    }

    /// For `threads` threads to sum in turns: the rows cut into up to [`chunks_for`] runs of
    /// consecutive rows, each with the range of `output` its tokens fall in
    /// (disjoint, since a token-major answer lists its tokens in ascending order; `None` when it
    /// does not, or when one thread would do).
    fn runs<'o>(&self, output: &'o mut [f32], threads: usize) -> Option<Vec<(TokenRows<'a>, &'o mut [f32], u32)>> {
        let ascending = self.tokens.windows(2).all(|pair| pair[0] < pair[1]);
        if threads < 2 || !ascending {
            return None;
        }
        let per_run = self.tokens.len().div_ceil(chunks_for(threads));
        let row_bytes = self.dtype.row_bytes(self.d_model);
        let mut runs = Vec::with_capacity(chunks_for(threads));
        let (mut rest, mut rest_first) = (output, 0u32);
        for (tokens, data) in self.tokens.chunks(per_run).zip(self.data.chunks(per_run * row_bytes)) {
            let (first, last) = (tokens[0], tokens[tokens.len() - 1]);
            let skipped = (first - rest_first) as usize * self.d_model;
            let (own, after) = rest.split_at_mut((last - rest_first + 1) as usize * self.d_model);
            runs.push((TokenRows { tokens, data, ..*self }, &mut own[skipped..], first));
            (rest, rest_first) = (after, last + 1);
        }
        Some(runs)
    }
}

/// Sums the runs on `threads` threads taking them in turns; the wall time, split between
/// decoding and adding in the proportion of the threads' own times.
fn sum_in_turns(threads: usize, runs: Vec<(TokenRows<'_>, &mut [f32], u32)>) -> (Duration, Duration) {
    let started = Instant::now();
    let times = Mutex::new((Duration::ZERO, Duration::ZERO));
    crate::cpu::in_turns(threads, runs.into_iter(), |(rows, output, first_token)| {
        let (decode, combine) = rows.add_into(output, first_token, &mut Vec::new());
        let mut times = lock(&times);
        times.0 += decode;
        times.1 += combine;
    });
    let (decode, combine) = times.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
    in_proportion(started.elapsed(), decode, combine)
}

/// `wall` split between decoding and adding in the proportion of `decode` to `combine`.
fn in_proportion(wall: Duration, decode: Duration, combine: Duration) -> (Duration, Duration) {
    let share = decode.as_secs_f64() / (decode + combine).as_secs_f64().max(f64::MIN_POSITIVE);
    let decode_share = wall.mul_f64(share);
    (decode_share, wall.saturating_sub(decode_share))
}

/// The call's output, summed answer by answer on the CPU pool.
#[derive(Debug, Default)]
pub(super) struct Sums {
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
            let rows = TokenRows { d_model: plan.d_model, dtype, tokens: &tokens.tokens, data: &combined.data };
            let threads = sum_threads(combined.data.len(), plan.cpu_threads);
            let (decode, combine) = rows.sum_into(&mut self.output, threads, &mut self.scratch);
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use switchyard_proto::wire::encode_rows;

    use super::*;

    const D_MODEL: usize = 3;

    /// Every other token of 0..2·`tokens`, each row `[token + 0.25, -token, 0.5]` as bf16.
    fn answer(tokens: usize) -> (Vec<u32>, Bytes) {
        let ids: Vec<u32> = (0..tokens as u32).map(|token| 2 * token + 1).collect();
        let values: Vec<f32> = ids.iter().flat_map(|&token| [token as f32 + 0.25, -(token as f32), 0.5]).collect();
        (ids, encode_rows(&values, D_MODEL, WireDtype::Bf16))
    }

    fn summed(rows: &TokenRows<'_>, threads: usize, outputs: usize) -> Vec<f32> {
        let mut output: Vec<f32> = (0..outputs * D_MODEL).map(|value| value as f32 / 8.0).collect();
        if threads == 1 {
            rows.add_into(&mut output, 0, &mut Vec::new());
        } else {
            let runs = rows.runs(&mut output, threads).expect("ascending tokens split");
            assert!(runs.len() > threads.min(rows.tokens.len()), "{} runs for {threads} threads", runs.len());
            sum_in_turns(threads, runs);
        }
        output
    }

    /// An answer summed by several threads, each run into its own range of the output, leaves the
    /// output equal bit for bit to the sum of one thread, the rows of tokens it lacks untouched.
    #[test]
    fn an_answer_summed_in_parts_equals_it_summed_alone() {
        let (tokens, data) = answer(37);
        let rows = TokenRows { d_model: D_MODEL, dtype: WireDtype::Bf16, tokens: &tokens, data: &data };
        let alone = summed(&rows, 1, 80);
        for threads in [2, 3, 8] {
            assert_eq!(summed(&rows, threads, 80), alone, "{threads} threads");
        }
        assert_eq!(alone[..D_MODEL], [0.0, 0.125, 0.25], "token 0 is in no answer row");
        assert_eq!(alone[D_MODEL..2 * D_MODEL], [0.375 + 1.25, 0.5 - 1.0, 0.625 + 0.5], "token 1's row added");
        assert_eq!(alone[75 * D_MODEL..][..D_MODEL], [28.125, 28.25, 28.375], "past the last token: untouched");
    }

    /// A thread per MiB of answer, up to the client's threads.
    #[test]
    fn an_answer_is_summed_by_a_thread_per_megabyte() {
        const MIB: usize = 1 << 20;
        assert_eq!(sum_threads(0, 8), 1);
        assert_eq!(sum_threads(2 * MIB - 1, 8), 1);
        assert_eq!(sum_threads(2 * MIB, 8), 2);
        assert_eq!(sum_threads(100 * MIB, 8), 8);
        assert_eq!(sum_threads(100 * MIB, 1), 1);
    }

    /// An answer's work for the pool is its tensors' bytes: the token-major sum's and every
    /// expert's rows.
    #[test]
    fn an_answer_s_work_counts_every_tensor_s_bytes() {
        let tensor = |bytes: usize| v1::WireTensor { data: Bytes::from(vec![0u8; bytes]), ..Default::default() };
        let output = |bytes: usize| v1::ExpertOutput { rows: Some(tensor(bytes)), ..Default::default() };
        let response = v1::ForwardResponse {
            combined: Some(tensor(10)),
            outputs: vec![output(3), v1::ExpertOutput::default(), output(4)],
            ..Default::default()
        };
        assert_eq!(answer_bytes(&response), 17);
        assert_eq!(answer_bytes(&v1::ForwardResponse::default()), 0);
    }

    /// The summing after the last answer is booked to decode and combine in the proportion of the
    /// answers' own decode and combine times; with neither measured, all of it to combine.
    #[test]
    fn a_tail_is_split_in_the_proportion_of_decode_to_combine() {
        let ms = Duration::from_millis;
        assert_eq!(in_proportion(ms(10), ms(1), ms(3)), (ms(10) / 4, ms(10) * 3 / 4));
        assert_eq!(in_proportion(ms(10), ms(3), ms(1)), (ms(10) * 3 / 4, ms(10) / 4));
        assert_eq!(in_proportion(ms(10), ms(2), Duration::ZERO), (ms(10), Duration::ZERO));
        assert_eq!(in_proportion(ms(10), Duration::ZERO, Duration::ZERO), (Duration::ZERO, ms(10)));
        assert_eq!(in_proportion(Duration::ZERO, ms(1), ms(1)), (Duration::ZERO, Duration::ZERO));
    }

    /// The decode and add times an answer's summing books are its own: some of each, and together
    /// no more than the summing took, whether one thread sums it or several in turns.
    #[test]
    fn an_answer_s_summing_books_its_decode_and_add_times() {
        let (tokens, data) = answer(4096);
        let rows = TokenRows { d_model: D_MODEL, dtype: WireDtype::Bf16, tokens: &tokens, data: &data };
        for threads in [1, 3] {
            let mut output = vec![0.0; 2 * tokens.len() * D_MODEL];
            let started = Instant::now();
            let (decode, combine) = rows.sum_into(&mut output, threads, &mut Vec::new());
            let wall = started.elapsed();
            assert!(
                decode > Duration::ZERO && combine > Duration::ZERO,
                "{threads} threads: {decode:?} and {combine:?}"
            );
            assert!(decode + combine <= wall, "{threads} threads: {decode:?} + {combine:?} over the {wall:?} it took");
        }
    }

    /// Tokens out of order or repeated could share an output range between two threads: they are
    /// summed by one.
    #[test]
    fn tokens_out_of_order_or_repeated_are_summed_by_one_thread() {
        let (mut tokens, data) = answer(8);
        tokens.swap(2, 5);
        let rows = TokenRows { d_model: D_MODEL, dtype: WireDtype::Bf16, tokens: &tokens, data: &data };
        assert!(rows.runs(&mut vec![0.0; 20 * D_MODEL], 4).is_none());
        let repeated = [1, 3, 3, 5, 7, 9, 11, 13];
        let rows = TokenRows { tokens: &repeated, ..rows };
        assert!(rows.runs(&mut vec![0.0; 20 * D_MODEL], 4).is_none(), "a token twice");
        let (ascending, _) = answer(8);
        let rows = TokenRows { tokens: &ascending, ..rows };
        assert!(rows.runs(&mut vec![0.0; 20 * D_MODEL], 1).is_none(), "one thread: no runs");
        assert_eq!(rows.runs(&mut vec![0.0; 20 * D_MODEL], 2).map(|runs| runs.len()), Some(8), "two threads: 8 runs");
    }
}
