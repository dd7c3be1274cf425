//! [`MoeClient`]: one MoE layer call, distributed. Gate and route here, send each worker its rows
//! (all workers at once), combine the answers, and say where the time and bytes went.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use switchyard_proto::v1::{self, Dtype, expert_worker_client::ExpertWorkerClient};
use switchyard_proto::wire;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::codec::decode_rows;
use crate::dispatch::{CallRows, PlannedRequest, by_worker, pack_requests};
use crate::error::ClientError;
use crate::gate::Gate;
use crate::ledger::{RpcTiming, WorkerCall, response_compute};
use crate::metrics::ClientMetrics;
use crate::router::{RoutingOverrides, RoutingSummary, assign, check_call, config_for_call, gate_and_route};
use crate::table::{RoutingTableView, TableReceiver};
use crate::timing::{ByteCounts, GRPC_FRAME_PREFIX, TimeBreakdown};
use switchyard_common::clock::unix_nanos;
use switchyard_common::transport::WireCounters;
use switchyard_model::checkpoint::Checkpoint;

/// How this client calls layers.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Element type of rows on the wire (both ways).
    pub wire_dtype: Dtype,
    /// Deadline of one worker request.
    pub timeout: Duration,
    /// A worker's payload above this many bytes is split over several requests.
    pub split_request_bytes: usize,
    /// Changes to the model's routing (policy, overflow, capacity factor).
    pub routing: RoutingOverrides,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            wire_dtype: Dtype::F32,
            timeout: Duration::from_secs(30),
            split_request_bytes: switchyard_common::transport::SPLIT_REQUEST_BYTES,
            routing: RoutingOverrides::default(),
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
    pub table_version: u64,
}

/// Which gate: a layer of a synthetic model (by seed) or of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GateKey {
    layer: u32,
    seed: u64,
    checkpoint: Option<String>,
}

/// A worker's gRPC client and the byte counters of its connection.
type WorkerConnection = (ExpertWorkerClient<Channel>, Arc<WireCounters>);

/// The distributed MoE layer. Cheap to share (`Arc`) between concurrent callers.
#[derive(Debug)]
pub struct MoeClient {
    tables: TableReceiver,
    options: ClientOptions,
    workers: Mutex<HashMap<Arc<str>, WorkerConnection>>,
    metrics: ClientMetrics,
    gates: Mutex<HashMap<GateKey, Arc<Gate>>>,
    next_request_id: AtomicU64,
}

impl MoeClient {
    pub fn new(tables: TableReceiver, options: ClientOptions) -> Self {
        // Request ids unique across client processes: pid in the high bits.
        let first_id = (u64::from(std::process::id()) << 32) | 1;
        Self {
            tables,
            options,
            workers: Mutex::new(HashMap::new()),
            metrics: ClientMetrics::default(),
            gates: Mutex::new(HashMap::new()),
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
    pub fn wire_bytes(&self) -> Vec<(Arc<str>, u64, u64)> {
        let workers = self.workers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut bytes: Vec<_> = workers
            .iter()
            .map(|(endpoint, (_, counters))| (endpoint.clone(), counters.sent(), counters.received()))
            .collect();
        bytes.sort();
        bytes
    }

    /// The table calls are routed with right now.
    pub fn table(&self) -> Option<Arc<RoutingTableView>> {
        self.tables.borrow().clone()
    }

    /// The gate of `layer`: seeded for a synthetic model, read once from a checkpoint otherwise.
    fn gate(&self, table: &RoutingTableView, layer: u32) -> Result<Arc<Gate>, ClientError> {
        let key = GateKey { layer, seed: table.model.seed, checkpoint: table.model.checkpoint.clone() };
        let mut gates = self.gates.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(gate) = gates.get(&key) {
            return Ok(gate.clone());
        }
        let gate = match &table.model.checkpoint {
            None => Gate::synthetic(&table.model, layer),
            Some(dir) => Checkpoint::open(std::path::Path::new(dir))
                .and_then(|checkpoint| Gate::from_checkpoint(&checkpoint, layer))
                .map_err(|error| ClientError::Checkpoint { reason: error.to_string() })?,
        };
        let gate = Arc::new(gate);
        gates.insert(key, gate.clone());
        Ok(gate)
    }

    fn worker(&self, endpoint: &Arc<str>, table_version: u64) -> Result<ExpertWorkerClient<Channel>, ClientError> {
        let mut workers = self.workers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((client, _)) = workers.get(endpoint) {
            return Ok(client.clone());
        }
        let counters = Arc::new(WireCounters::default());
        let channel = switchyard_common::transport::counted_channel(endpoint, counters.clone()).map_err(|error| {
            ClientError::BadTable { version: table_version, reason: format!("endpoint {endpoint}: {error}") }
        })?;
        let client = ExpertWorkerClient::new(channel)
            .max_decoding_message_size(switchyard_common::transport::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(switchyard_common::transport::MAX_MESSAGE_BYTES);
        workers.insert(endpoint.clone(), (client.clone(), counters));
        Ok(client)
    }

    /// Runs `hidden` (`[tokens, d_model]`, row-major) through MoE layer `layer`.
    pub async fn forward(&self, layer: u32, hidden: &[f32]) -> Result<LayerOutput, ClientError> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("layer_forward", request_id, layer);
        let output = self.forward_inner(request_id, layer, hidden).instrument(span).await;
        self.metrics.observe(&output);
        output
    }

    async fn forward_inner(&self, request_id: u64, layer: u32, hidden: &[f32]) -> Result<LayerOutput, ClientError> {
        let started = Instant::now();
        let table = self
            .table()
            .ok_or(ClientError::NoTable { coordinator: "(not connected)".into(), waited: Duration::ZERO })?;
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
        let config = config_for_call(model, &self.options.routing);
        config.check_tokens(hidden.len() / d_model)?;
        let mut timing = TimeBreakdown::default();

        let phase = Instant::now();
        let gate = self.gate(&table, layer)?;
        let (logits, routing) = gate_and_route(&gate, hidden, config);
        timing.gate = phase.elapsed();

        let phase = Instant::now();
        let routed = assign(&gate, hidden, logits, routing, config);
        let workers = by_worker(layer, &routed.groups, &table)?;
        timing.plan = phase.elapsed();

        let call = CallRows {
            layer,
            hidden,
            d_model,
            dtype: self.options.wire_dtype,
            split_bytes: self.options.split_request_bytes,
        };
        let mut requests: Vec<PlannedRequest> = Vec::new();
        let mut worker_calls: Vec<WorkerCall> = Vec::with_capacity(workers.len());
        for (endpoint, groups) in &workers {
            let phase = Instant::now();
            let packed = pack_requests(endpoint, groups, &routed.groups, call);
            let mut worker_call = WorkerCall::new(endpoint.clone());
            for planned in &packed {
                worker_call.requests += 1;
                worker_call.rows += planned.pieces.iter().map(|piece| piece.end - piece.start).sum::<usize>();
                worker_call.bytes.payload_sent += planned
                    .request
                    .batches
                    .iter()
                    .map(|b| b.rows.as_ref().map_or(0, |t| t.data.len() as u64))
                    .sum::<u64>();
                worker_call.bytes.message_sent += planned.request.encoded_len() as u64 + GRPC_FRAME_PREFIX;
            }
            worker_call.encode = phase.elapsed();
            timing.encode += worker_call.encode;
            requests.extend(packed.into_iter().map(|mut planned| {
                planned.request.request_id = request_id;
                planned
            }));
            worker_calls.push(worker_call);
        }

        let calls = requests.iter().map(|planned| self.call(planned, request_id, table.version));
        let answers = futures::future::join_all(calls).await;
        let mut responses = Vec::with_capacity(answers.len());
        for answer in answers {
            responses.push(answer?);
        }

        // The straggler's RPC is the call's network + queue + compute time.
        if let Some((response, rpc)) = responses.iter().max_by_key(|(_, rpc)| rpc.elapsed) {
            let worker = Duration::from_micros(response.worker_us).min(rpc.elapsed);
            let compute = response_compute(response).min(worker);
            timing.network = rpc.elapsed - worker;
            timing.compute = compute;
            timing.queue_wait = worker - compute;
        }

        let mut output = vec![0.0f32; hidden.len()];
        let mut scratch = Vec::new();
        for (planned, (response, rpc)) in requests.iter().zip(&responses) {
            let Some(worker_call) = worker_calls.iter_mut().find(|call| call.endpoint == planned.endpoint) else {
                continue;
            };
            worker_call.record_answer(response, rpc);
            if response.outputs.len() != planned.pieces.len() {
                return Err(ClientError::BadResponse {
                    endpoint: planned.endpoint.to_string(),
                    reason: format!("{} outputs for {} expert batches", response.outputs.len(), planned.pieces.len()),
                });
            }
            for (index, (piece, answer)) in planned.pieces.iter().zip(&response.outputs).enumerate() {
                let group = &routed.groups[piece.group];
                let rows = piece.end - piece.start;
                let payload = check_output(&planned.endpoint, index, answer, layer, group.expert, rows, d_model)?;
                worker_call.bytes.payload_received += payload.data.len() as u64;

                let phase = Instant::now();
                decode_rows(&payload.data, Dtype::try_from(payload.dtype).unwrap_or(Dtype::F32), &mut scratch);
                let decode = phase.elapsed();
                worker_call.decode += decode;
                timing.decode += decode;

                let phase = Instant::now();
                routed.combine_rows(group, piece.start..piece.end, &scratch, d_model, &mut output);
                let combine = phase.elapsed();
                worker_call.combine += combine;
                timing.combine += combine;
            }
        }
        let mut bytes = ByteCounts::default();
        for worker_call in &worker_calls {
            bytes += worker_call.bytes;
        }

        timing.wall = started.elapsed();
        let routing = RoutingSummary::from_routed(&routed);
        Ok(LayerOutput {
            hidden: output,
            router_logits: routed.logits,
            routing,
            timing,
            bytes,
            workers: worker_calls,
            table_version: table.version,
        })
    }

    async fn call(
        &self,
        planned: &PlannedRequest,
        request_id: u64,
        table_version: u64,
    ) -> Result<(v1::ForwardResponse, RpcTiming), ClientError> {
        let mut client = self.worker(&planned.endpoint, table_version)?;
        let mut request = tonic::Request::new(planned.request.clone());
        request.set_timeout(self.options.timeout);
        if let Ok(value) = request_id.to_string().parse() {
            request.metadata_mut().insert("x-request-id", value);
        }
        let sent_unix_nanos = unix_nanos();
        let started = Instant::now();
        let answer = tokio::time::timeout(self.options.timeout, client.forward(request)).await;
        let rpc = RpcTiming { elapsed: started.elapsed(), sent_unix_nanos, answered_unix_nanos: unix_nanos() };
        match answer {
            Ok(Ok(response)) => Ok((response.into_inner(), rpc)),
            Ok(Err(status)) => Err(ClientError::Worker {
                endpoint: planned.endpoint.to_string(),
                code: status.code(),
                message: status.message().to_owned(),
            }),
            Err(_) => Err(ClientError::Timeout { endpoint: planned.endpoint.to_string(), after: self.options.timeout }),
        }
    }
}

fn check_output<'a>(
    endpoint: &str,
    index: usize,
    answer: &'a v1::ExpertOutput,
    layer: u32,
    expert: u32,
    rows: usize,
    d_model: usize,
) -> Result<&'a v1::WireTensor, ClientError> {
    let bad = |reason: String| ClientError::BadResponse { endpoint: endpoint.to_owned(), reason };
    if answer.expert != Some(v1::ExpertKey::new(layer, expert)) {
        return Err(bad(format!(
            "outputs[{index}].expert is {:?}, expected layer {layer} expert {expert}",
            answer.expert
        )));
    }
    let payload = answer.rows.as_ref().ok_or_else(|| bad(format!("outputs[{index}].rows is missing")))?;
    let dtype = Dtype::try_from(payload.dtype).ok().filter(|dtype| *dtype != Dtype::Unspecified);
    let expected = dtype.and_then(wire::element_size).map(|size| rows * d_model * size);
    if payload.shape != [rows as u64, d_model as u64] || expected != Some(payload.data.len()) {
        return Err(bad(format!(
            "outputs[{index}].rows has shape {:?} and {} bytes, expected [{rows}, {d_model}]",
            payload.shape,
            payload.data.len()
        )));
    }
    Ok(payload)
}
