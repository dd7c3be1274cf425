//! A layer computed in the caller's own process, driven as a cluster's layer is: the reference
//! layer (`switchyard-reference`) implements it. The load tester reaches such a layer only through
//! this trait, so the binary that drives clusters alone links no libtorch.

use std::sync::Arc;

use futures::future::BoxFuture;
use switchyard_model::ModelSpec;

use crate::error::ClientError;
use crate::router::{RoutingOverrides, RoutingSummary};
use crate::timing::TimeBreakdown;

pub trait InProcessLayer: Send + Sync + std::fmt::Debug {
    fn model(&self) -> &ModelSpec;

    /// Runs `hidden` through `layer` with `routing` applied.
    fn forward_rows<'a>(
        &'a self,
        layer: u32,
        hidden: &'a Arc<Vec<f32>>,
        routing: &'a RoutingOverrides,
    ) -> BoxFuture<'a, Result<InProcessOutput, ClientError>>;
}

/// One in-process layer call's result.
#[derive(Debug, Clone)]
pub struct InProcessOutput {
    /// `[tokens, d_model]`: the layer's output.
    pub hidden: Vec<f32>,
    pub routing: RoutingSummary,
    pub timing: TimeBreakdown,
}
