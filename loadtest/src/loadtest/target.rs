//! Where calls go ([`Target`]: the distributed layer or an in-process one) and what one call is:
//! its layers in order, the attention stand-in before each, the residual stream between them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_model::ModelSpec;
use switchyard_router_client::client::MoeClient;
use switchyard_router_client::error::ClientError;
use switchyard_router_client::layer::InProcessLayer;
use switchyard_router_client::ledger::WorkerCall;
use switchyard_router_client::router::{RoutingOverrides, RoutingSummary};
use switchyard_router_client::timing::{ByteCounts, TimeBreakdown};

use super::LoadSpec;
use super::step::{PreparedStandIn, ResidualStream};

/// Where calls go.
#[derive(Debug, Clone)]
pub enum Target {
    Distributed(Arc<MoeClient>),
    Reference(Arc<dyn InProcessLayer>),
}

impl Target {
    /// Socket bytes so far per worker endpoint: `(endpoint, sent, received)`.
    pub(super) fn wire_bytes(&self) -> Vec<(Arc<str>, u64, u64)> {
        match self {
            Target::Distributed(client) => client.wire_bytes(),
            Target::Reference(_) => Vec::new(),
        }
    }

    pub(super) fn model(&self) -> Option<ModelSpec> {
        match self {
            Target::Distributed(client) => client.table().map(|table| table.model.clone()),
            Target::Reference(reference) => Some(reference.model().clone()),
        }
    }

    /// One call of `plan`: its layers in order, the stand-in before each, outcomes merged.
    pub(super) async fn call(
        &self,
        plan: &CallPlan,
        hidden: Arc<Vec<f32>>,
        routing: RoutingOverrides,
    ) -> Result<CallOutcome, ClientError> {
        let mut merged: Option<CallOutcome> = None;
        let mut input = hidden;
        let mut stream: Option<ResidualStream> = None;
        for (position, &layer) in plan.layers.iter().enumerate() {
            let attention = plan.stand_in.run(&input).await;
            let (mut outcome, output) = self.call_layer(layer, input.clone(), routing).await?;
            outcome.attention = attention;
            if position + 1 < plan.layers.len() {
                // The client adds the layer's output to the residual stream before the next layer:
                // its time is the combine's.
                let started = Instant::now();
                let residual = stream.take().unwrap_or_else(|| ResidualStream::new(&input, plan.d_model));
                let (residual, next) = tokio::task::spawn_blocking(move || {
                    let mut residual = residual;
                    let next = residual.advance(&output);
                    (residual, next)
                })
                .await
                .map_err(|error| ClientError::Internal { reason: format!("the residual stream's task: {error}") })?;
                (stream, input) = (Some(residual), Arc::new(next));
                let added = started.elapsed();
                outcome.timing.combine += added;
                outcome.timing.wall += added;
            }
            match &mut merged {
                None => merged = Some(outcome),
                Some(step) => step.add_layer(outcome),
            }
        }
        let mut outcome =
            merged.ok_or(ClientError::InvalidInput { field: "layers", reason: "no layer to call".into() })?;
        outcome.routing.stats = outcome.routing.stats.mean_of(plan.layers.len() as u64);
        Ok(outcome)
    }

    async fn call_layer(
        &self,
        layer: u32,
        hidden: Arc<Vec<f32>>,
        routing: RoutingOverrides,
    ) -> Result<(CallOutcome, Vec<f32>), ClientError> {
        match self {
            // The distributed client carries its overrides in its options.
            Target::Distributed(client) => {
                let output = client.forward(layer, &hidden).await?;
                let outcome = CallOutcome {
                    routing: output.routing,
                    timing: output.timing,
                    bytes: output.bytes,
                    workers: vec![(layer, output.workers)],
                    attention: Duration::ZERO,
                };
                Ok((outcome, output.hidden))
            }
            // Its experts compute on its worker's thread, as the distributed layer's do on theirs.
            Target::Reference(reference) => {
                let output = reference.forward_rows(layer, &hidden, &routing).await?;
                let outcome = CallOutcome { routing: output.routing, timing: output.timing, ..CallOutcome::default() };
                Ok((outcome, output.hidden))
            }
        }
    }
}

/// The layers each call runs through, and what stands in for attention before each.
pub(super) struct CallPlan {
    layers: Vec<u32>,
    stand_in: PreparedStandIn,
    d_model: usize,
}

impl CallPlan {
    pub(super) fn of(spec: &LoadSpec, d_model: usize) -> Self {
        let (layers, stand_in) = match &spec.step {
            Some(step) => (step.layers.clone(), PreparedStandIn::new(step.attention, d_model)),
            None => (vec![spec.layer], PreparedStandIn::None),
        };
        Self { layers, stand_in, d_model }
    }
}

#[derive(Default)]
pub(super) struct CallOutcome {
    pub(super) routing: RoutingSummary,
    pub(super) timing: TimeBreakdown,
    pub(super) bytes: ByteCounts,
    /// Each layer's workers' shares of this call.
    pub(super) workers: Vec<(u32, Vec<WorkerCall>)>,
    /// The attention stand-ins' time.
    pub(super) attention: Duration,
}

impl CallOutcome {
    /// Folds the next layer of a step in: the same tokens, every other count and time added.
    fn add_layer(&mut self, layer: CallOutcome) {
        let routing = &mut self.routing;
        routing.assignments += layer.routing.assignments;
        routing.dropped += layer.routing.dropped;
        routing.rerouted += layer.routing.rerouted;
        routing.refused += layer.routing.refused;
        routing.stats += layer.routing.stats;
        if routing.tokens_per_expert.len() < layer.routing.tokens_per_expert.len() {
            routing.tokens_per_expert.resize(layer.routing.tokens_per_expert.len(), 0);
        }
        for (total, load) in routing.tokens_per_expert.iter_mut().zip(&layer.routing.tokens_per_expert) {
            *total += load;
        }
        self.timing += layer.timing;
        self.bytes += layer.bytes;
        self.workers.extend(layer.workers);
        self.attention += layer.attention;
    }
}

#[cfg(test)]
mod tests {
    use switchyard_router_client::stats::RouterStats;

    use super::*;

    fn layer(experts: Vec<u32>, counts: usize, worker: &str) -> CallOutcome {
        CallOutcome {
            routing: RoutingSummary {
                tokens: 4,
                assignments: 8,
                dropped: counts,
                rerouted: 2 * counts,
                refused: 3 * counts,
                tokens_per_expert: experts,
                stats: RouterStats { imbalance: 1.5, ..RouterStats::default() },
                ..RoutingSummary::default()
            },
            timing: TimeBreakdown { network: Duration::from_millis(counts as u64), ..TimeBreakdown::default() },
            bytes: ByteCounts { payload_sent: 100 * counts as u64, ..ByteCounts::default() },
            workers: vec![(counts as u32, vec![WorkerCall::new(worker.into())])],
            attention: Duration::from_micros(10 * counts as u64),
        }
    }

    /// A step's layers add up into one outcome: the same tokens, every count, time and byte
    /// summed, loads per expert added position by position (a longer list extending it), each
    /// layer's workers kept under its layer.
    #[test]
    fn a_steps_layers_fold_into_one_outcome() {
        let mut step = layer(vec![1, 2], 1, "a");
        step.add_layer(layer(vec![3, 4, 5], 2, "b"));
        step.add_layer(layer(vec![1], 4, "a"));
        let routing = &step.routing;
        assert_eq!((routing.tokens, routing.assignments), (4, 24));
        assert_eq!((routing.dropped, routing.rerouted, routing.refused), (7, 14, 21));
        assert_eq!(routing.tokens_per_expert, [5, 6, 5]);
        assert_eq!(routing.stats.imbalance, 4.5);
        assert_eq!((step.timing.network, step.bytes.payload_sent), (Duration::from_millis(7), 700));
        assert_eq!(step.attention, Duration::from_micros(70));
        let layers: Vec<(u32, &str)> =
            step.workers.iter().map(|(layer, workers)| (*layer, &*workers[0].endpoint)).collect();
        assert_eq!(layers, [(1, "a"), (2, "b"), (4, "a")]);
    }
}
