//! The worker's one error enum, and its one mapping to gRPC status codes.

use switchyard_proto::v1::ExpertKey;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum WorkerError {
    /// A request field is malformed; `field` is its path in the request, e.g. `batches[1].rows.shape`.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The expert's queue cannot take these tokens now: it is the expert capacity, shared by all clients.
    #[error("{field}: expert queue full for {expert}: {queued} of {limit} tokens queued, {requested} more asked")]
    QueueFull { field: String, expert: ExpertKey, queued: usize, limit: usize, requested: usize },
    /// The worker is stopping or lost its compute thread.
    #[error("worker unavailable: {0}")]
    Unavailable(String),
    /// Loading an expert failed; the expert was not made visible.
    #[error("loading {expert} failed: {reason}")]
    Load { expert: ExpertKey, reason: String },
    /// libtorch failed during a forward.
    #[error("expert forward failed: {0}")]
    Compute(String),
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
            WorkerError::Compute(_) => Code::Internal,
        }
    }
}

impl From<WorkerError> for Status {
    fn from(error: WorkerError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_chosen_on_purpose_and_messages_name_the_field() {
        let full = WorkerError::QueueFull {
            field: "batches[0]".into(),
            expert: ExpertKey::new(0, 3),
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
        let invalid = Status::from(WorkerError::invalid("batches[1].rows.dtype", "unsupported"));
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert!(invalid.message().starts_with("batches[1].rows.dtype"));
    }
}
