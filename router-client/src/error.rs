//! The client library's one error enum. A worker's refusal arrives as a `tonic::Status` and is read
//! here once, details included ([`ClientError::from_status`]): callers act on a full queue or a
//! malformed field as data, not by parsing messages.

use std::time::Duration;

use switchyard_model::{ExpertId, TableVersion};
use switchyard_proto::status;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ClientError {
    #[error("{field}: {reason}")]
    InvalidInput { field: &'static str, reason: String },
    #[error(
        "no routing table received from the coordinator at {coordinator} within {waited:?} (a coordinator \
         publishes its first once its --min-workers workers have registered)"
    )]
    NoTable { coordinator: String, waited: Duration },
    /// Tables came, but none was what the caller waited for (say, one placing every expert).
    #[error(
        "no routing table from the coordinator at {coordinator} was ready within {waited:?}: the latest, version \
         {version}, places {placed} of {experts} experts on {workers} worker(s)"
    )]
    TableNotReady {
        coordinator: String,
        waited: Duration,
        version: TableVersion,
        placed: usize,
        experts: usize,
        workers: usize,
    },
    #[error("routing table version {version} has no worker for {expert}")]
    Unplaced { version: TableVersion, expert: ExpertId },
    #[error("routing table version {version} is malformed: {reason}")]
    BadTable { version: TableVersion, reason: String },
    #[error("worker endpoint {endpoint} is unusable: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    /// The worker's queue for `expert` could not take the rows: the expert capacity, shared by all
    /// clients, was reached (`RESOURCE_EXHAUSTED`).
    #[error(
        "worker {endpoint}: expert queue full for {expert}: {queued} of {limit} tokens queued, {requested} more asked"
    )]
    QueueFull { endpoint: String, expert: ExpertId, queued: u64, limit: u64, requested: u64 },
    /// The client refused the call itself, sending nothing: `endpoint` accepted too few of the
    /// requests it was sent lately (adaptive throttling, [`crate::throttle`]).
    #[error(
        "worker {endpoint} accepted {accepts} of the last {requests} requests it was sent (full expert queues): \
         the client refused this call itself rather than send it (adaptive throttling)"
    )]
    Throttled { endpoint: String, requests: u64, accepts: u64 },
    /// The worker found a field of the request malformed (`INVALID_ARGUMENT`); `field` is its path.
    #[error("worker {endpoint}: {field}: {description}")]
    BadRequest { endpoint: String, field: String, description: String },
    #[error("worker {endpoint}: {code:?}: {message}")]
    Worker { endpoint: String, code: tonic::Code, message: String },
    #[error("worker {endpoint} did not answer within {after:?}")]
    Timeout { endpoint: String, after: Duration },
    #[error("checkpoint: {reason}")]
    Checkpoint { reason: String },
    #[error("worker {endpoint} sent a malformed answer: {reason}")]
    BadResponse { endpoint: String, reason: String },
    /// The client itself failed (its CPU pool could not start, or its work panicked).
    #[error("client: {reason}")]
    Internal { reason: String },
}

impl ClientError {
    /// The error a worker's `status` stands for, read from its details where it has them.
    pub fn from_status(endpoint: &str, status: &tonic::Status) -> Self {
        let endpoint = endpoint.to_owned();
        if let Some(full) = status::QueueFull::from_status(status) {
            return ClientError::QueueFull {
                endpoint,
                expert: full.expert.into(),
                queued: full.queued,
                limit: full.limit,
                requested: full.requested,
            };
        }
        if status.code() == tonic::Code::InvalidArgument
            && let Some((field, description)) = status::field_violation(status)
        {
            return ClientError::BadRequest { endpoint, field, description };
        }
        // tonic's timeout layer (this channel's own, which starts first, or a server's without
        // Switchyard's deadline layer) ends a call whose grpc-timeout passed with CANCELLED;
        // gRPC's code for it is DEADLINE_EXCEEDED.
        if status.code() == tonic::Code::Cancelled && status.message() == tonic::TimeoutExpired(()).to_string() {
            let message = format!("the call's deadline passed ({})", status.message());
            return ClientError::Worker { endpoint, code: tonic::Code::DeadlineExceeded, message };
        }
        ClientError::Worker { endpoint, code: status.code(), message: status.message().to_owned() }
    }

    /// Whether an expert's queue was full: the worker answered, and may take the rows later or
    /// another holder may take them now.
    pub fn is_queue_full(&self) -> bool {
        matches!(self, ClientError::QueueFull { .. })
    }

    /// The gRPC code this failure is reported under in load-test summaries.
    pub fn code(&self) -> tonic::Code {
        match self {
            ClientError::InvalidInput { .. } | ClientError::BadTable { .. } | ClientError::BadRequest { .. } => {
                tonic::Code::InvalidArgument
            }
            ClientError::NoTable { .. }
            | ClientError::TableNotReady { .. }
            | ClientError::Unplaced { .. }
            | ClientError::BadEndpoint { .. } => tonic::Code::Unavailable,
            ClientError::QueueFull { .. } | ClientError::Throttled { .. } => tonic::Code::ResourceExhausted,
            ClientError::Worker { code, .. } => *code,
            ClientError::Timeout { .. } => tonic::Code::DeadlineExceeded,
            ClientError::BadResponse { .. } | ClientError::Internal { .. } => tonic::Code::Internal,
            ClientError::Checkpoint { .. } => tonic::Code::FailedPrecondition,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::v1;

    #[test]
    fn a_status_with_details_becomes_typed_data() {
        let refusal = status::QueueFull { expert: v1::ExpertKey::new(1, 4), queued: 12, limit: 16, requested: 8 };
        let error = ClientError::from_status("http://w", &refusal.into_status("full"));
        assert_eq!(
            error,
            ClientError::QueueFull {
                endpoint: "http://w".into(),
                expert: ExpertId::new(1, 4),
                queued: 12,
                limit: 16,
                requested: 8
            }
        );
        assert_eq!(error.code(), tonic::Code::ResourceExhausted);
        let bad = status::bad_request("batches[0].rows.data", "needs 32 bytes, got 30", "whatever the message says");
        assert_eq!(
            ClientError::from_status("http://w", &bad),
            ClientError::BadRequest {
                endpoint: "http://w".into(),
                field: "batches[0].rows.data".into(),
                description: "needs 32 bytes, got 30".into()
            }
        );
        let late = ClientError::from_status("http://w", &tonic::Status::cancelled("Timeout expired"));
        assert_eq!(late.code(), tonic::Code::DeadlineExceeded, "tonic's server-side timeout: {late}");
        let cancelled = ClientError::from_status("http://w", &tonic::Status::cancelled("the client went away"));
        assert_eq!(cancelled.code(), tonic::Code::Cancelled);
        let plain = ClientError::from_status("http://w", &tonic::Status::unavailable("gone"));
        assert_eq!(plain.code(), tonic::Code::Unavailable);
    }
}
