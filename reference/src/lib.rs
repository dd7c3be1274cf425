//! The in-process reference layer: the client's own pipeline (gate, routing, capacity, dispatch,
//! exchange, combine) over an [`in_process`] transport to one worker in this process that holds
//! every expert. Nothing is computed twice in two ways: the reference differs from the distributed
//! layer by the network only, so tests compare the two and benchmarks measure what the network and
//! the processes cost.
//!
//! Calls run one at a time, as the baseline a single process would be: a load test against the
//! reference measures one layer computing alone, not a batching server.

pub mod in_process;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use switchyard_expert_worker::metrics::WorkerMetrics;
use switchyard_expert_worker::{ExpertWorker, ExpertWorkerService, QueueLimits, WorkerError, WorkerOptions};
use switchyard_model::{ExpertId, ModelSpec, WeightDtype};
use switchyard_proto::wire::WireDtype;
use switchyard_router_client::router::RoutingSummary;
use switchyard_router_client::timing::TimeBreakdown;
use switchyard_router_client::{
    ByteCounts, ClientError, ClientOptions, DispatchLayout, Hidden, InProcessLayer, InProcessOutput, MoeClient,
    RoutingOverrides, RoutingTableView,
};
use tokio::sync::{Mutex, watch};

use crate::in_process::InProcessTransport;

/// The answer of one reference call.
#[derive(Debug, Clone)]
pub struct ReferenceOutput {
    pub hidden: Vec<f32>,
    pub router_logits: Vec<f32>,
    pub routing: RoutingSummary,
    /// Gate, plan, encode, queue and compute, decode, combine; the network share is the in-process hop.
    pub timing: TimeBreakdown,
    /// What the in-process hop carried each way, in the config's wire dtype and layout.
    pub bytes: ByteCounts,
}

/// Where and how the reference computes.
#[derive(Debug, Clone, Copy)]
pub struct ReferenceConfig {
    pub device: tch::Device,
    /// libtorch intra-op threads of its compute thread.
    pub torch_threads: u32,
    /// Identity experts (each returns its input): the counterpart of workers with
    /// `--identity-experts`, for pure-communication measurements.
    pub identity_experts: bool,
    /// How long each step holds the compute thread at least, as the workers' `--identity-hold-us`.
    pub step_hold: std::time::Duration,
    /// Each step's experts in one grouped product per matrix, as the workers' `--grouped-experts`.
    pub grouped_experts: bool,
    /// The dtype experts are resident and compute in, as the workers' `--dtype`; `None`: the
    /// checkpoint's own dtype, bf16 for synthetic models on CUDA and f32 on CPU.
    pub dtype: Option<WeightDtype>,
    /// On a CPU, each step's rows and answers moved as on a GPU: see
    /// [`WorkerOptions::copied_transfers_on_cpu`].
    pub copied_transfers_on_cpu: bool,
    /// The rows' element type between the client and the worker, as the clients'
    /// `--wire-dtype`: the worker converts them on its device.
    pub wire_dtype: WireDtype,
    /// How the rows travel to the worker, as the clients' `--dispatch`.
    pub dispatch: DispatchLayout,
}

impl ReferenceConfig {
    /// CPU, one thread, the model's experts in their own dtype, f32 rows sent token-major.
    pub fn cpu() -> Self {
        Self {
            device: tch::Device::Cpu,
            torch_threads: 1,
            identity_experts: false,
            step_hold: std::time::Duration::ZERO,
            grouped_experts: false,
            dtype: None,
            copied_transfers_on_cpu: false,
            wire_dtype: WireDtype::F32,
            dispatch: DispatchLayout::TokenMajor,
        }
    }

    /// The same, computing in `dtype`.
    pub fn with_dtype(self, dtype: WeightDtype) -> Self {
        Self { dtype: Some(dtype), ..self }
    }
}

/// The one worker's name in the reference's routing table.
const IN_PROCESS: &str = "in-process";

/// Why a reference layer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("starting the in-process worker: {0}")]
    Start(#[from] std::io::Error),
    #[error(transparent)]
    Load(#[from] WorkerError),
}

/// `Sync`: share it between callers; their calls take turns.
#[derive(Debug)]
pub struct ReferenceLayer {
    model: ModelSpec,
    client: MoeClient,
    worker: Arc<ExpertWorker>,
    metrics: WorkerMetrics,
    /// Keeps the fixed routing table alive for the client.
    _table: watch::Sender<Option<Arc<RoutingTableView>>>,
    one_at_a_time: Mutex<()>,
    /// Set by [`ReferenceLayer::shutdown`]: the one worker would refuse every attempt of a later
    /// call, and the client would retry it until its deadline, so such a call is refused at once.
    shut_down: AtomicBool,
}

impl ReferenceLayer {
    /// Loads every expert (routed and shared) of the MoE layers `layers` of `model`: seeded for a
    /// synthetic model, read from its checkpoint otherwise, identities if `config` says so.
    pub async fn start(model: &ModelSpec, layers: &[u32], config: ReferenceConfig) -> Result<Self, ReferenceError> {
        // Every row of a call at once, without waiting for other calls' rows.
        let options = WorkerOptions {
            torch_threads: config.torch_threads.max(1) as i32,
            identity_experts: config.identity_experts,
            step_hold: config.step_hold,
            grouped_experts: config.grouped_experts,
            dtype: config.dtype,
            copied_transfers_on_cpu: config.copied_transfers_on_cpu,
            ..WorkerOptions::in_process(config.device)
        };
        let metrics = WorkerMetrics::new();
        let worker = ExpertWorker::start(options, metrics.clone())?;
        let per_layer = model.experts_per_layer + model.shared_experts;
        let experts: Vec<ExpertId> =
            layers.iter().flat_map(|layer| (0..per_layer).map(move |expert| ExpertId::new(*layer, expert))).collect();
        worker.load_experts(model.clone(), experts, QueueLimits::default()).await?;
        let table = RoutingTableView::single_worker(model.clone(), IN_PROCESS, u32::MAX);
        let (sender, tables) = watch::channel(Some(Arc::new(table)));
        let transport =
            InProcessTransport::new([(Arc::from(IN_PROCESS), ExpertWorkerService::new(worker.clone(), IN_PROCESS))]);
        let options =
            ClientOptions { wire_dtype: config.wire_dtype, dispatch: config.dispatch, ..ClientOptions::default() };
        let client = MoeClient::with_transport(tables, options, Arc::new(transport));
        Ok(Self {
            model: model.clone(),
            client,
            worker,
            metrics,
            _table: sender,
            one_at_a_time: Mutex::new(()),
            shut_down: AtomicBool::new(false),
        })
    }

    pub fn model(&self) -> &ModelSpec {
        &self.model
    }

    /// Expert batches computed so far in grouped products (`ReferenceConfig::grouped_experts`
    /// where the device runs them).
    pub fn grouped_batches(&self) -> u64 {
        self.metrics.grouped_batches.get()
    }

    /// Bytes the worker's steps have uploaded so far (with `ReferenceConfig::copied_transfers_on_cpu`
    /// or on a GPU, each token-major part's index and gate-weight runs besides the rows).
    pub fn staged_bytes(&self) -> u64 {
        self.metrics.staged_bytes.get()
    }

    /// Runs `hidden` through layer `layer`, routed as the model says with `overrides` applied.
    pub async fn forward(
        &self,
        layer: u32,
        hidden: impl Into<Hidden>,
        overrides: &RoutingOverrides,
    ) -> Result<ReferenceOutput, ClientError> {
        let _turn = self.one_at_a_time.lock().await;
        if self.shut_down.load(Ordering::Acquire) {
            return Err(ClientError::Worker {
                endpoint: IN_PROCESS.to_owned(),
                code: tonic::Code::Unavailable,
                message: "the reference layer is shut down".to_owned(),
            });
        }
        let output = self.client.forward_with(layer, hidden, overrides).await?;
        Ok(ReferenceOutput {
            hidden: output.hidden,
            router_logits: output.router_logits,
            routing: output.routing,
            timing: output.timing,
            bytes: output.bytes,
        })
    }

    /// Stops the compute thread after what is queued; later calls fail at once.
    pub async fn shutdown(&self) {
        self.shut_down.store(true, Ordering::Release);
        self.worker.shutdown().await;
    }
}

impl InProcessLayer for ReferenceLayer {
    fn model(&self) -> &ModelSpec {
        &self.model
    }

    fn forward_rows<'a>(
        &'a self,
        layer: u32,
        hidden: &'a Arc<Vec<f32>>,
        routing: &'a RoutingOverrides,
    ) -> BoxFuture<'a, Result<InProcessOutput, ClientError>> {
        Box::pin(async move {
            let output = self.forward(layer, hidden, routing).await?;
            Ok(InProcessOutput { hidden: output.hidden, routing: output.routing, timing: output.timing })
        })
    }
}

/// `‖a − b‖_F / ‖b‖_F`: the numerical contract's measure.
pub fn relative_frobenius_error(actual: &[f32], expected: &[f32]) -> f64 {
    let (mut difference, mut norm) = (0.0f64, 0.0f64);
    for (a, b) in actual.iter().zip(expected) {
        difference += f64::from(a - b).powi(2);
        norm += f64::from(*b).powi(2);
    }
    (difference / norm.max(f64::MIN_POSITIVE)).sqrt()
}

#[cfg(test)]
mod tests {
    use switchyard_experts::Expert;
    use switchyard_router_client::gate::Gate;
    use switchyard_router_client::router::gate_and_route;

    use super::*;

    fn small_dropless_model() -> ModelSpec {
        ModelSpec {
            d_model: 8,
            d_ff: 16,
            experts_per_layer: 4,
            top_k: 2,
            capacity: switchyard_model::CapacityPolicy::Dropless,
            ..ModelSpec::default_synthetic()
        }
    }

    fn hidden_of(tokens: usize) -> Vec<f32> {
        (0..tokens * 8).map(|i| (i as f32 * 0.3).cos()).collect()
    }

    async fn forward_once(config: ReferenceConfig, hidden: &[f32]) -> (ReferenceLayer, ReferenceOutput) {
        let reference = ReferenceLayer::start(&small_dropless_model(), &[0], config).await.expect("reference");
        let output = reference.forward(0, hidden, &RoutingOverrides::default()).await.expect("forward");
        (reference, output)
    }

    #[tokio::test]
    async fn the_reference_sums_weighted_expert_outputs() {
        let model = small_dropless_model();
        let hidden = hidden_of(3);
        let (reference, output) = forward_once(ReferenceConfig::cpu(), &hidden).await;
        assert_eq!(output.routing.dropped, 0);
        // Token 1 by hand: its two experts, each run alone, weighted.
        let config = switchyard_router_client::router::RoutingConfig::for_model(&model);
        let (_, routing) = gate_and_route(&Gate::synthetic(&model, 0), &hidden, config);
        let row = &hidden[8..16];
        let mut expected = vec![0.0f32; 8];
        for (expert, weight) in routing.token_choices(1) {
            let out = Expert::synthetic(&model, 0, *expert, tch::Device::Cpu, WeightDtype::F32).forward_f32(row);
            for (e, o) in expected.iter_mut().zip(out) {
                *e += weight * o;
            }
        }
        assert!(relative_frobenius_error(&output.hidden[8..16], &expected) < 1e-6);
        let error = reference.forward(3, &hidden, &RoutingOverrides::default()).await.unwrap_err().to_string();
        assert_eq!(error, "layer: 3 is not a MoE layer of synthetic; its MoE layers are [0]");
        let error = reference.forward(0, &hidden[..5], &RoutingOverrides::default()).await.unwrap_err();
        assert!(error.to_string().starts_with("hidden"), "{error}");
    }

    #[tokio::test]
    async fn identity_experts_return_each_token_scaled_by_its_gate_weights() {
        let hidden = hidden_of(3);
        let config = ReferenceConfig { identity_experts: true, ..ReferenceConfig::cpu() };
        let (_, output) = forward_once(config, &hidden).await;
        let model = small_dropless_model();
        let routing_config = switchyard_router_client::router::RoutingConfig::for_model(&model);
        let (_, routing) = gate_and_route(&Gate::synthetic(&model, 0), &hidden, routing_config);
        for token in 0..3 {
            let weight: f32 = routing.token_choices(token).iter().map(|(_, weight)| weight).sum();
            let expected: Vec<f32> = hidden[token * 8..(token + 1) * 8].iter().map(|x| x * weight).collect();
            assert!(relative_frobenius_error(&output.hidden[token * 8..(token + 1) * 8], &expected) < 1e-6);
        }
    }

    #[tokio::test]
    async fn a_step_hold_keeps_each_call_at_least_that_long() {
        let hold = std::time::Duration::from_millis(40);
        let config = ReferenceConfig { identity_experts: true, step_hold: hold, ..ReferenceConfig::cpu() };
        let reference = ReferenceLayer::start(&small_dropless_model(), &[0], config).await.expect("reference");
        let started = std::time::Instant::now();
        reference.forward(0, hidden_of(1), &RoutingOverrides::default()).await.expect("forward");
        assert!(started.elapsed() >= hold, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn experts_compute_in_the_configured_dtype() {
        let hidden = hidden_of(4);
        let (_, f32_output) = forward_once(ReferenceConfig::cpu(), &hidden).await;
        let (_, bf16_output) = forward_once(ReferenceConfig::cpu().with_dtype(WeightDtype::Bf16), &hidden).await;
        // bf16 keeps 8 bits of mantissa: an error of ~1e-3, never 0 and never 1e-1.
        let error = relative_frobenius_error(&bf16_output.hidden, &f32_output.hidden);
        assert!((1e-4..1e-2).contains(&error), "{error}");
    }

    #[tokio::test]
    async fn grouped_experts_are_counted_and_answer_as_experts_one_by_one() {
        let hidden = hidden_of(6);
        let (plain, one_by_one) = forward_once(ReferenceConfig::cpu(), &hidden).await;
        let grouped_config = ReferenceConfig { grouped_experts: true, ..ReferenceConfig::cpu() };
        let (grouped, in_groups) = forward_once(grouped_config, &hidden).await;
        let experts_chosen = in_groups.routing.tokens_per_expert.iter().filter(|tokens| **tokens > 0).count() as u64;
        assert!(experts_chosen > 1, "{:?}", in_groups.routing.tokens_per_expert);
        assert_eq!((plain.grouped_batches(), grouped.grouped_batches()), (0, experts_chosen));
        assert!(relative_frobenius_error(&in_groups.hidden, &one_by_one.hidden) < 1e-6);
    }

    #[tokio::test]
    async fn shutting_down_finishes_the_call_in_flight_and_refuses_later_ones() {
        let hold = std::time::Duration::from_millis(200);
        let config = ReferenceConfig { identity_experts: true, step_hold: hold, ..ReferenceConfig::cpu() };
        let reference =
            Arc::new(ReferenceLayer::start(&small_dropless_model(), &[0], config).await.expect("reference"));
        let in_flight = tokio::spawn({
            let reference = reference.clone();
            async move { reference.forward(0, hidden_of(1), &RoutingOverrides::default()).await }
        });
        while reference.worker.tokens_served() == 0 && !in_flight.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        reference.shutdown().await;
        let served = in_flight.await.expect("the call's task").expect("the call in flight is served");
        assert_eq!(served.hidden.len(), 8);
        let refused = reference.forward(0, hidden_of(1), &RoutingOverrides::default()).await.unwrap_err();
        assert_eq!(refused.to_string(), "worker in-process: Unavailable: the reference layer is shut down");
    }

    #[tokio::test]
    async fn soft_moe_of_one_token_mixes_every_expert_by_its_slots_combine_mass() {
        let model = ModelSpec { d_model: 8, d_ff: 16, experts_per_layer: 4, ..ModelSpec::default_synthetic() };
        let reference = ReferenceLayer::start(&model, &[0], ReferenceConfig::cpu()).await.expect("reference");
        let x: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).sin()).collect();
        let soft = RoutingOverrides {
            policy: Some(switchyard_router_client::routing::RoutingPolicy::SoftMoe { slots: 2 }),
            ..Default::default()
        };
        let output = reference.forward(0, &x, &soft).await.expect("forward");
        // One token: each slot's input is the token itself; C is a softmax over all 8 slot logits.
        let logits = Gate::synthetic(&model, 0).slot_logits(&x, 2);
        let max = logits.iter().copied().fold(f32::MIN, f32::max);
        let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        let mut expected = vec![0.0f32; 8];
        for expert in 0..4u32 {
            let mass: f32 =
                logits[expert as usize * 2..expert as usize * 2 + 2].iter().map(|l| (l - max).exp() / total).sum();
            let out = Expert::synthetic(&model, 0, expert, tch::Device::Cpu, WeightDtype::F32).forward_f32(&x);
            for (e, o) in expected.iter_mut().zip(out) {
                *e += mass * o;
            }
        }
        assert!(relative_frobenius_error(&output.hidden, &expected) < 1e-5);
        assert_eq!(output.routing.dropped, 0);
    }
}
