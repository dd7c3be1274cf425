//! The client library's one error enum. `tonic::Status` stays inside: callers see what failed, on
//! which worker, with the gRPC code kept for reports.

use std::time::Duration;

use switchyard_proto::v1::ExpertKey;

#[derive(Debug, thiserror::Error, Clone)]
pub enum ClientError {
    #[error("{field}: {reason}")]
    InvalidInput { field: &'static str, reason: String },
    #[error("no routing table received from the coordinator at {coordinator} within {waited:?}")]
    NoTable { coordinator: String, waited: Duration },
    #[error("routing table version {version} has no worker for {expert}")]
    Unplaced { version: u64, expert: ExpertKey },
    #[error("routing table version {version} is malformed: {reason}")]
    BadTable { version: u64, reason: String },
    #[error("worker {endpoint}: {code:?}: {message}")]
    Worker { endpoint: String, code: tonic::Code, message: String },
    #[error("worker {endpoint} did not answer within {after:?}")]
    Timeout { endpoint: String, after: Duration },
    #[error("checkpoint: {reason}")]
    Checkpoint { reason: String },
    #[error("worker {endpoint} sent a malformed answer: {reason}")]
    BadResponse { endpoint: String, reason: String },
}

impl ClientError {
    /// The gRPC code this failure is reported under in load-test summaries.
    pub fn code(&self) -> tonic::Code {
        match self {
            ClientError::InvalidInput { .. } | ClientError::BadTable { .. } => tonic::Code::InvalidArgument,
            ClientError::NoTable { .. } | ClientError::Unplaced { .. } => tonic::Code::Unavailable,
            ClientError::Worker { code, .. } => *code,
            ClientError::Timeout { .. } => tonic::Code::DeadlineExceeded,
            ClientError::BadResponse { .. } => tonic::Code::Internal,
            ClientError::Checkpoint { .. } => tonic::Code::FailedPrecondition,
        }
    }
}
