//! The in-process reference layer as a load-test target: the engine in `switchyard-loadtest` drives
//! it through [`InProcessLayer`] without linking libtorch itself.

use std::sync::Arc;

use futures::future::BoxFuture;
use switchyard_loadtest::loadtest::{InProcessLayer, Target};
use switchyard_model::ModelSpec;
use switchyard_reference::ReferenceLayer;
use switchyard_router_client::error::ClientError;
use switchyard_router_client::router::{RoutingOverrides, RoutingSummary};
use switchyard_router_client::timing::TimeBreakdown;

/// Calls go to `reference`, computing in this process.
pub fn reference_target(reference: Arc<ReferenceLayer>) -> Target {
    Target::Reference(Arc::new(InProcessReference(reference)))
}

#[derive(Debug)]
struct InProcessReference(Arc<ReferenceLayer>);

impl InProcessLayer for InProcessReference {
    fn model(&self) -> &ModelSpec {
        self.0.model()
    }

    fn forward<'a>(
        &'a self,
        layer: u32,
        hidden: &'a Arc<Vec<f32>>,
        routing: &'a RoutingOverrides,
    ) -> BoxFuture<'a, Result<(RoutingSummary, TimeBreakdown), ClientError>> {
        Box::pin(async move {
            let output = self.0.forward(layer, hidden, routing).await?;
            Ok((output.routing, output.timing))
        })
    }
}
