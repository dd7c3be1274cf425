//! The coordinator's one error enum and its one mapping to gRPC statuses, with gRPC's richer
//! error details (`switchyard_proto::status`) so that a worker or a tool acts on them as data.

use switchyard_proto::status;
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
        let message = error.to_string();
        match error {
            CoordinatorError::ProtocolMismatch { .. } => {
                status::with_reason(Code::FailedPrecondition, "PROTOCOL_MISMATCH", message)
            }
            CoordinatorError::UnknownWorker(_) => status::with_reason(Code::NotFound, "UNKNOWN_WORKER", message),
            CoordinatorError::InvalidArgument { field, reason } => status::bad_request(field, &reason, message),
            CoordinatorError::NotOwner(_) => status::with_reason(Code::PermissionDenied, "NOT_OWNER", message),
            CoordinatorError::TooManyWorkers { limit } => {
                status::WorkerLimit { limit: limit as u64 }.into_status(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_keeps_its_code_and_message_and_travels_with_details() {
        let invalid = CoordinatorError::InvalidArgument { field: "endpoint", reason: "empty".into() };
        let status = Status::from(invalid);
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "endpoint: empty"));
        assert_eq!(status::field_violation(&status), Some(("endpoint".into(), "empty".into())));

        let full = Status::from(CoordinatorError::TooManyWorkers { limit: 4 });
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert!(full.message().starts_with("registration refused: 4 workers are registered"), "{}", full.message());
        assert_eq!(status::WorkerLimit::from_status(&full), Some(status::WorkerLimit { limit: 4 }));

        let cases = [
            (
                CoordinatorError::ProtocolMismatch { worker: 1, coordinator: 2 },
                Code::FailedPrecondition,
                "PROTOCOL_MISMATCH",
            ),
            (CoordinatorError::UnknownWorker("w1".into()), Code::NotFound, "UNKNOWN_WORKER"),
            (CoordinatorError::NotOwner("w1".into()), Code::PermissionDenied, "NOT_OWNER"),
        ];
        for (error, code, reason) in cases {
            let message = error.to_string();
            let status = Status::from(error);
            assert_eq!((status.code(), status.message()), (code, message.as_str()));
            assert_eq!(status::reason(&status).as_deref(), Some(reason));
        }
    }
}
