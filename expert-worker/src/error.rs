//! The worker's one error enum, and its one mapping to gRPC status codes.

use switchyard_model::ExpertId;
use switchyard_proto::status;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum WorkerError {
    /// A request field is malformed; `field` is its path in the request, e.g. `batches[1].rows.shape`.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The expert's queue cannot take these tokens now: it is the expert capacity, shared by all clients.
    #[error("{field}: expert queue full for {expert}: {queued} of {limit} tokens queued, {requested} more asked")]
    QueueFull { field: String, expert: ExpertId, queued: usize, limit: usize, requested: usize },
    /// The worker is stopping or lost its compute thread.
    #[error("worker unavailable: {0}")]
    Unavailable(String),
    /// Loading an expert failed; the expert was not made visible.
    #[error("loading {expert} failed: {reason}")]
    Load { expert: ExpertId, reason: String },
    /// libtorch failed during a forward.
    #[error("expert forward failed: {0}")]
    Compute(String),
    /// Handling the request panicked: a bug of the worker's, which goes on serving other requests.
    #[error("the worker panicked handling the request: {0}")]
    Panicked(String),
}

impl WorkerError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        WorkerError::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    pub fn code(&self) -> Code {
        match self {
            WorkerError::InvalidArgument { .. } => Code::InvalidArgument,
            WorkerError::QueueFull { .. } => Code::ResourceExhausted,
            WorkerError::Unavailable(_) => Code::Unavailable,
            WorkerError::Load { .. } => Code::FailedPrecondition,
            WorkerError::Compute(_) | WorkerError::Panicked(_) => Code::Internal,
        }
    }
}

/// The status of `error`, with its structured details (gRPC's richer error model): a full queue
/// as `QueueFull` data, a malformed field as a `BadRequest` naming it.
impl From<WorkerError> for Status {
    fn from(error: WorkerError) -> Self {
        let message = error.to_string();
        match error {
            WorkerError::QueueFull { expert, queued, limit, requested, .. } => status::QueueFull {
                expert: expert.into(),
                queued: queued as u64,
                limit: limit as u64,
                requested: requested as u64,
            }
            .into_status(message),
            WorkerError::InvalidArgument { field, reason } => status::bad_request(&field, &reason, message),
            WorkerError::Unavailable(_) => status::with_reason(Code::Unavailable, "WORKER_UNAVAILABLE", message),
            WorkerError::Load { .. } => status::with_reason(Code::FailedPrecondition, "EXPERT_LOAD_FAILED", message),
            WorkerError::Compute(_) => status::with_reason(Code::Internal, "EXPERT_COMPUTE_FAILED", message),
            WorkerError::Panicked(_) => status::with_reason(Code::Internal, "WORKER_PANICKED", message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_chosen_on_purpose_and_messages_name_the_field() {
        let full = WorkerError::QueueFull {
            field: "batches[0]".into(),
            expert: ExpertId::new(0, 3),
            queued: 10,
            limit: 16,
            requested: 8,
        };
        let status = Status::from(full);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "batches[0]: expert queue full for layer 0 expert 3: 10 of 16 tokens queued, 8 more asked"
        );
        let details = status::QueueFull::from_status(&status).expect("the refusal travels as data");
        assert_eq!(
            (details.expert, details.queued, details.limit, details.requested),
            (ExpertId::new(0, 3).into(), 10, 16, 8)
        );
        let invalid = Status::from(WorkerError::invalid("batches[1].rows.dtype", "unsupported"));
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert!(invalid.message().starts_with("batches[1].rows.dtype"));
        assert_eq!(status::field_violation(&invalid), Some(("batches[1].rows.dtype".into(), "unsupported".into())));
    }
}
