//! The coordinator's one error enum and its one mapping to gRPC status codes.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CoordinatorError {
    #[error("protocol_version: worker speaks {worker}, this coordinator speaks {coordinator}")]
    ProtocolMismatch { worker: u32, coordinator: u32 },
    #[error("worker_id: unknown worker '{0}' (the coordinator may have restarted); register again")]
    UnknownWorker(String),
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// A heartbeat or drain for a worker id from another certificate than the one that
    /// registered it.
    #[error("worker_id: worker '{0}' was registered over another certificate")]
    NotOwner(String),
    /// A registration beyond `--max-workers`; taken once a registered worker leaves.
    #[error(
        "registration refused: {limit} workers are registered, the most this coordinator takes (its --max-workers); it is taken once one leaves"
    )]
    TooManyWorkers { limit: usize },
}

impl From<CoordinatorError> for Status {
    fn from(error: CoordinatorError) -> Self {
        let code = match &error {
            CoordinatorError::ProtocolMismatch { .. } => Code::FailedPrecondition,
            CoordinatorError::UnknownWorker(_) => Code::NotFound,
            CoordinatorError::InvalidArgument { .. } => Code::InvalidArgument,
            CoordinatorError::NotOwner(_) => Code::PermissionDenied,
            CoordinatorError::TooManyWorkers { .. } => Code::ResourceExhausted,
        };
        Status::new(code, error.to_string())
    }
}
