//! Errors as they cross the wire: gRPC's richer error model (`google.rpc.Status` details, via
//! `tonic-types`), so a peer acts on a refusal as data and tools such as grpcurl show it.
//!
//! | refusal | code | details |
//! | --- | --- | --- |
//! | a full expert queue | `RESOURCE_EXHAUSTED` | `ErrorInfo` (reason `QUEUE_FULL`, metadata `expert`, `queued`, `limit`, `requested`), `QuotaFailure`, `ResourceInfo` |
//! | a registration past the coordinator's `--max-workers` | `RESOURCE_EXHAUSTED` | `ErrorInfo` (reason `WORKER_LIMIT`, metadata `limit`), `QuotaFailure` |
//! | a malformed field | `INVALID_ARGUMENT` | `BadRequest` with the field's path |
//! | anything else | its code | `ErrorInfo` with a reason |

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::v1;

/// `ErrorInfo.domain` of every Switchyard error.
pub const DOMAIN: &str = "switchyard.v1";

/// `ErrorInfo.reason` of a full expert queue.
pub const QUEUE_FULL: &str = "QUEUE_FULL";

/// `ErrorInfo.reason` of a registration past the coordinator's `--max-workers`.
pub const WORKER_LIMIT: &str = "WORKER_LIMIT";

/// A registration refused because the coordinator has its most workers (`--max-workers`); it is
/// taken once a registered worker leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLimit {
    /// The most workers the coordinator registers at once.
    pub limit: u64,
}

impl WorkerLimit {
    /// The `RESOURCE_EXHAUSTED` status carrying this refusal as details, with `message`.
    pub fn into_status(self, message: impl Into<String>) -> Status {
        let metadata = HashMap::from([("limit".to_owned(), self.limit.to_string())]);
        let mut details = ErrorDetails::with_error_info(WORKER_LIMIT, DOMAIN, metadata);
        details.add_quota_failure_violation(
            "registered workers",
            format!("{} workers registered, the coordinator's --max-workers", self.limit),
        );
        Status::with_error_details(Code::ResourceExhausted, message, details)
    }

    /// The refusal carried by `status`, if it is one.
    pub fn from_status(status: &Status) -> Option<Self> {
        let metadata = metadata_of(status, WORKER_LIMIT)?;
        Some(Self { limit: metadata.get("limit")?.parse().ok()? })
    }
}

/// A full expert queue, as a worker refuses it: the expert capacity, shared by all clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    pub expert: v1::ExpertKey,
    /// Tokens already queued for the expert.
    pub queued: u64,
    /// The queue's limit in tokens.
    pub limit: u64,
    /// Tokens the refused request asked to add.
    pub requested: u64,
}

impl QueueFull {
    /// The `RESOURCE_EXHAUSTED` status carrying this refusal as details, with `message`.
    pub fn into_status(self, message: impl Into<String>) -> Status {
        let expert = self.expert.to_string();
        let metadata = HashMap::from([
            ("expert".to_owned(), expert.clone()),
            ("queued".to_owned(), self.queued.to_string()),
            ("limit".to_owned(), self.limit.to_string()),
            ("requested".to_owned(), self.requested.to_string()),
        ]);
        let mut details = ErrorDetails::with_error_info(QUEUE_FULL, DOMAIN, metadata);
        details.add_quota_failure_violation(
            expert.clone(),
            format!("{} of {} tokens queued, {} more asked", self.queued, self.limit, self.requested),
        );
        details.set_resource_info("expert queue", expert, "", "the expert capacity, shared by every client");
        Status::with_error_details(Code::ResourceExhausted, message, details)
    }

    /// The refusal carried by `status`, if it is one.
    pub fn from_status(status: &Status) -> Option<Self> {
        let metadata = metadata_of(status, QUEUE_FULL)?;
        let number = |key: &str| metadata.get(key)?.parse::<u64>().ok();
        let expert = parse_expert(metadata.get("expert")?)?;
        Some(Self { expert, queued: number("queued")?, limit: number("limit")?, requested: number("requested")? })
    }
}

/// `layer L expert E` back into a key.
fn parse_expert(text: &str) -> Option<v1::ExpertKey> {
    match text.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["layer", layer, "expert", expert] => Some(v1::ExpertKey::new(layer.parse().ok()?, expert.parse().ok()?)),
        _ => None,
    }
}

/// The `INVALID_ARGUMENT` status naming `field` (its path in the request) in a `BadRequest`.
pub fn bad_request(field: &str, description: &str, message: impl Into<String>) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        message,
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

/// The first field violation of `status`'s `BadRequest`: `(field, description)`.
pub fn field_violation(status: &Status) -> Option<(String, String)> {
    let request = status.get_details_bad_request()?;
    let violation = request.field_violations.into_iter().next()?;
    Some((violation.field, violation.description))
}

/// A status with `code`, `message` and an `ErrorInfo` naming `reason`.
pub fn with_reason(code: Code, reason: &str, message: impl Into<String>) -> Status {
    Status::with_error_details(code, message, ErrorDetails::with_error_info(reason, DOMAIN, HashMap::new()))
}

/// The reason of `status`'s `ErrorInfo`, when it is one of Switchyard's.
pub fn reason(status: &Status) -> Option<String> {
    let info = status.get_details_error_info()?;
    (info.domain == DOMAIN).then_some(info.reason)
}

/// The metadata of `status`'s `ErrorInfo` when it is Switchyard's of `reason`.
fn metadata_of(status: &Status, reason: &str) -> Option<HashMap<String, String>> {
    let info = status.get_details_error_info()?;
    (info.domain == DOMAIN && info.reason == reason).then_some(info.metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_refusal_round_trips_as_details() {
        let refusal = QueueFull { expert: v1::ExpertKey::new(2, 5), queued: 10, limit: 16, requested: 8 };
        let status = refusal.into_status("queue full");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(QueueFull::from_status(&status), Some(refusal));
        let quota = status.get_details_quota_failure().expect("a QuotaFailure too, for generic tools");
        assert_eq!(quota.violations[0].subject, "layer 2 expert 5");
        assert_eq!(QueueFull::from_status(&Status::resource_exhausted("plain")), None);
    }

    /// Only an `ErrorInfo` of this reason in this domain is a queue refusal, however well its
    /// metadata would parse.
    #[test]
    fn another_reason_or_domain_is_not_a_queue_refusal() {
        let metadata = HashMap::from(
            [("expert", "layer 0 expert 1"), ("queued", "4"), ("limit", "4"), ("requested", "1")]
                .map(|(key, value)| (key.to_owned(), value.to_owned())),
        );
        let status = |reason: &str, domain: &str| {
            let details = ErrorDetails::with_error_info(reason, domain, metadata.clone());
            Status::with_error_details(Code::ResourceExhausted, "full", details)
        };
        assert!(QueueFull::from_status(&status(QUEUE_FULL, DOMAIN)).is_some(), "the metadata parses");
        assert_eq!(QueueFull::from_status(&status("RATE_LIMITED", DOMAIN)), None);
        assert_eq!(QueueFull::from_status(&status(QUEUE_FULL, "example.com")), None);
    }

    #[test]
    fn a_worker_limit_round_trips_as_details_and_is_no_queue_refusal() {
        let status = WorkerLimit { limit: 3 }.into_status("registration refused");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(WorkerLimit::from_status(&status), Some(WorkerLimit { limit: 3 }));
        let quota = status.get_details_quota_failure().expect("a QuotaFailure too, for generic tools");
        assert_eq!(quota.violations[0].subject, "registered workers");
        assert_eq!(QueueFull::from_status(&status), None);
        let queue = QueueFull { expert: v1::ExpertKey::new(0, 1), queued: 1, limit: 1, requested: 1 };
        assert_eq!(WorkerLimit::from_status(&queue.into_status("full")), None);
        assert_eq!(WorkerLimit::from_status(&Status::resource_exhausted("plain")), None);
        assert_eq!(reason(&status).as_deref(), Some(WORKER_LIMIT));
        assert_eq!(reason(&with_reason(Code::NotFound, "UNKNOWN_WORKER", "gone")).as_deref(), Some("UNKNOWN_WORKER"));
        assert_eq!(reason(&Status::not_found("plain")), None);
    }

    #[test]
    fn a_bad_request_names_its_field_in_the_details() {
        let status = bad_request("batches[1].rows.shape", "expected [3, 8]", "batches[1].rows.shape: expected [3, 8]");
        assert_eq!(field_violation(&status), Some(("batches[1].rows.shape".into(), "expected [3, 8]".into())));
        assert_eq!(field_violation(&Status::invalid_argument("no details")), None);
    }
}
