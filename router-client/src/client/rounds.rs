//! What a worker's failure allows ([`Retry`]), and what a call's rounds change besides its answers
//! ([`Rounds`]): the table, the workers given up on, the refused and moved assignments.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use switchyard_model::RequestId;

use crate::error::ClientError;
use crate::router::RoutingSummary;
use crate::table::RoutingTableView;
use crate::transport::Endpoint;

/// What a worker's failure allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Retry {
    /// The call fails: the request or the answer was wrong, and would be anywhere.
    Never,
    /// Another holder of the experts may take the rows (a full queue, a stalled worker).
    OtherHolder,
    /// The worker is gone: another holder, or the table that moves its experts elsewhere.
    OtherHolderOrNewTable,
}

impl Retry {
    /// Whether to give the failed worker up and send its rows elsewhere, rather than end the
    /// call at once (which cancels its other requests at their workers before they compute):
    /// always for a worker that is gone; for a full queue only when the expert has another
    /// holder; for a stalled worker only when some expert is replicated.
    pub(super) fn worth_it(self, error: &ClientError, table: &RoutingTableView, layer: u32) -> bool {
        match (self, error) {
            (Retry::Never, _) => false,
            (Retry::OtherHolderOrNewTable, _) => true,
            (Retry::OtherHolder, ClientError::QueueFull { expert, .. }) => {
                table.endpoints(layer, expert.expert).len() > 1
            }
            (Retry::OtherHolder, _) => table.has_replicas(),
        }
    }

    pub(super) fn of(error: &ClientError) -> Self {
        match error {
            ClientError::Worker { code, .. } => match code {
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Aborted => {
                    Retry::OtherHolderOrNewTable
                }
                tonic::Code::ResourceExhausted | tonic::Code::DeadlineExceeded => Retry::OtherHolder,
                _ => Retry::Never,
            },
            ClientError::BadEndpoint { .. } => Retry::OtherHolderOrNewTable,
            ClientError::QueueFull { .. } | ClientError::Timeout { .. } => Retry::OtherHolder,
            _ => Retry::Never,
        }
    }
}

/// A call's rounds: the first sends the plan's requests, each later one what failed workers left
/// unanswered, to other holders. What they change besides the answers is kept here.
pub(super) struct Rounds {
    pub(super) request_id: RequestId,
    pub(super) layer: u32,
    pub(super) deadline: Instant,
    /// The table the call routes by: a newer one once a worker is gone and its experts moved.
    pub(super) table: Arc<RoutingTableView>,
    /// Workers given up on in this call.
    pub(super) excluded: HashSet<Endpoint>,
    pub(super) retried_requests: usize,
    /// (from, to) experts of the assignments a full queue refused and the next-best policy moved.
    pub(super) moves: Vec<(u32, u32)>,
    /// (expert, assignments) a full queue refused, or throttling held back, and the refusal
    /// policy let overflow.
    pub(super) refused: Vec<(u32, usize)>,
}

impl Rounds {
    /// Counts the refused assignments as such and the moved ones at the experts that took them.
    pub(super) fn settle(self, routing: &mut RoutingSummary) {
        let kept = &mut routing.tokens_per_expert;
        for (expert, count) in self.refused {
            routing.refused += count;
            if let Some(kept) = kept.get_mut(expert as usize) {
                *kept = kept.saturating_sub(count as u32);
            }
        }
        for (from, to) in self.moves {
            routing.rerouted += 1;
            if let Some(kept) = kept.get_mut(from as usize) {
                *kept = kept.saturating_sub(1);
            }
            if let Some(kept) = kept.get_mut(to as usize) {
                *kept += 1;
            }
        }
    }
}
