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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use switchyard_model::{ExpertId, ModelSpec};
    use switchyard_proto::v1;

    use super::*;

    fn worker(code: tonic::Code) -> ClientError {
        ClientError::Worker { endpoint: "http://w".into(), code, message: "from the worker".into() }
    }

    fn queue_full(expert: u32) -> ClientError {
        let expert = ExpertId::new(0, expert);
        ClientError::QueueFull { endpoint: "http://w".into(), expert, queued: 8, limit: 8, requested: 1 }
    }

    #[test]
    fn a_gone_worker_may_be_replaced_a_busy_one_only_by_another_holder_a_wrong_call_never() {
        use tonic::Code;
        for code in [Code::Unavailable, Code::Unknown, Code::Cancelled, Code::Aborted] {
            assert_eq!(Retry::of(&worker(code)), Retry::OtherHolderOrNewTable, "{code:?}");
        }
        for code in [Code::ResourceExhausted, Code::DeadlineExceeded] {
            assert_eq!(Retry::of(&worker(code)), Retry::OtherHolder, "{code:?}");
        }
        for code in [Code::InvalidArgument, Code::Internal, Code::FailedPrecondition, Code::NotFound] {
            assert_eq!(Retry::of(&worker(code)), Retry::Never, "{code:?}");
        }
        let unreachable = ClientError::BadEndpoint { endpoint: "http://w".into(), reason: "no such host".into() };
        assert_eq!(Retry::of(&unreachable), Retry::OtherHolderOrNewTable);
        let late = ClientError::Timeout { endpoint: "http://w".into(), after: Duration::from_secs(1) };
        assert_eq!((Retry::of(&queue_full(0)), Retry::of(&late)), (Retry::OtherHolder, Retry::OtherHolder));
        let garbled = ClientError::BadResponse { endpoint: "http://w".into(), reason: "outputs[0] is missing".into() };
        assert_eq!(Retry::of(&garbled), Retry::Never);
    }

    /// Expert 0 on workers a and b, expert 1 on a alone.
    fn table(replicated: bool) -> RoutingTableView {
        let model = ModelSpec { experts_per_layer: 2, ..ModelSpec::default_synthetic() };
        let holders_of_0 =
            if replicated { vec!["http://a".into(), "http://b".into()] } else { vec!["http://a".into()] };
        let route = |expert, endpoints| v1::ExpertRoute { expert: Some(v1::ExpertKey::new(0, expert)), endpoints };
        let table = v1::RoutingTable {
            version: 1,
            epoch: 1,
            model: Some(model.to_proto()),
            routes: vec![route(0, holders_of_0), route(1, vec!["http://a".into()])],
            queue_limit_tokens: 8,
            max_batch_tokens: 8,
        };
        RoutingTableView::try_from(table).expect("valid")
    }

    #[test]
    fn a_full_queue_is_worth_retrying_only_where_its_expert_has_another_holder() {
        let (replicated, single) = (table(true), table(false));
        assert!(Retry::OtherHolder.worth_it(&queue_full(0), &replicated, 0));
        assert!(!Retry::OtherHolder.worth_it(&queue_full(1), &replicated, 0), "expert 1 has one holder");
        let late = ClientError::Timeout { endpoint: "http://a".into(), after: Duration::from_secs(1) };
        assert!(Retry::OtherHolder.worth_it(&late, &replicated, 0), "some expert has another holder");
        assert!(!Retry::OtherHolder.worth_it(&late, &single, 0));
        let gone = worker(tonic::Code::Unavailable);
        assert!(Retry::OtherHolderOrNewTable.worth_it(&gone, &single, 0), "the next table may move its experts");
        assert!(!Retry::Never.worth_it(&gone, &replicated, 0));
    }

    #[test]
    fn settling_counts_refusals_and_moves_at_the_experts_that_kept_them() {
        let rounds = Rounds {
            request_id: RequestId(1),
            layer: 0,
            deadline: Instant::now(),
            table: Arc::new(table(true)),
            excluded: HashSet::new(),
            retried_requests: 0,
            moves: vec![(0, 1), (0, 1), (1, 2)],
            refused: vec![(2, 3), (0, 1), (9, 4)],
        };
        let mut routing = RoutingSummary { tokens_per_expert: vec![5, 2, 4], ..RoutingSummary::default() };
        rounds.settle(&mut routing);
        assert_eq!((routing.refused, routing.rerouted), (8, 3));
        assert_eq!(routing.tokens_per_expert, [2, 3, 2], "expert 9 is past the layer and counted nowhere");
    }
}
