//! A call's `grpc-timeout` ended as the gRPC spec says: DEADLINE_EXCEEDED. Tonic's own timeout
//! layer sits outside every layer a server can add and answers CANCELLED "Timeout expired"
//! (hyperium/tonic#606 chose that code), so a client other than ours would read a deadline as a
//! cancellation. This layer ends the call one timer tick before tonic's does, with
//! DEADLINE_EXCEEDED naming the deadline, and drops the handler's future as tonic's would.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;
use tonic::codegen::http::{HeaderMap, Request};

use crate::around_call::{Answered, AroundCall};

/// The resolution of Tokio's timer, which tonic's timeout layer runs on: a timer set one tick
/// earlier fires first.
pub const TIMER_TICK: Duration = Duration::from_millis(1);

/// The call's `grpc-timeout` (gRPC's format: at most 8 digits and a unit, H M S m u n).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Answers DEADLINE_EXCEEDED for a call whose `grpc-timeout` passes before its answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnswerDeadlines;

impl AroundCall for AnswerDeadlines {
    fn around<B, E: 'static>(
        &self,
        request: Request<B>,
        handle: impl FnOnce(Request<B>) -> Answered<E>,
    ) -> Answered<E> {
        let timeout = grpc_timeout(request.headers());
        let answer = handle(request);
        let Some(timeout) = timeout else { return answer };
        let deadline = Instant::now() + timeout.saturating_sub(TIMER_TICK);
        let expired = move || {
            let message = format!("the call's deadline (grpc-timeout {timeout:?}) passed before its answer");
            Ok(tonic::Status::deadline_exceeded(message).into_http())
        };
        Box::pin(async move {
            let (mut answer, mut timer) = (std::pin::pin!(answer), std::pin::pin!(tokio::time::sleep_until(deadline)));
            // The clock first: a busy runtime may wake this call for its answer and its timer at
            // once, and an answer later than the deadline is not one the caller still waits for.
            std::future::poll_fn(|cx| {
                if Instant::now() >= deadline {
                    return Poll::Ready(expired());
                }
                if let Poll::Ready(answered) = answer.as_mut().poll(cx) {
                    return Poll::Ready(answered);
                }
                timer.as_mut().poll(cx).map(|()| expired())
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{Layer, Service, ServiceExt};

    use super::*;
    use crate::around_call::{Answer, CallLayer};

    fn request(timeout: Option<&str>) -> Request<()> {
        let mut request = Request::builder().uri("/test.Service/Call").body(()).expect("request");
        if let Some(timeout) = timeout {
            request.headers_mut().insert("grpc-timeout", timeout.parse().expect("ascii"));
        }
        request
    }

    fn status_of(response: &Answer) -> Option<(String, String)> {
        let header = |name: &str| response.headers().get(name).map(|value| value.to_str().expect("ascii").to_owned());
        Some((header("grpc-status")?, header("grpc-message").unwrap_or_default()))
    }

    /// An answer slower than the deadline is replaced by DEADLINE_EXCEEDED (4) naming it; a faster
    /// one, or a call without a deadline, is the handler's own.
    #[tokio::test]
    async fn a_call_past_its_grpc_timeout_is_answered_deadline_exceeded() {
        let inner = tower::service_fn(|request: Request<()>| async move {
            if request.headers().contains_key("x-slow") {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok::<_, Infallible>(tonic::Status::ok("answered").into_http())
        });
        let mut service = CallLayer(AnswerDeadlines).layer(inner);

        let mut slow = request(Some("20m"));
        slow.headers_mut().insert("x-slow", "1".parse().expect("ascii"));
        let started = std::time::Instant::now();
        let answer = service.ready().await.expect("ready").call(slow).await.expect("an answer");
        let (code, message) = status_of(&answer).expect("a status");
        assert_eq!(code, "4", "{message}");
        assert!(message.contains("deadline") && message.contains("20ms"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(5), "the handler was not waited for");

        let answer = service.ready().await.expect("ready").call(request(Some("5S"))).await.expect("an answer");
        assert_eq!(status_of(&answer).expect("a status").0, "0");
        let answer = service.ready().await.expect("ready").call(request(None)).await.expect("an answer");
        assert_eq!(status_of(&answer).expect("a status").0, "0");
    }

    #[test]
    fn grpc_timeouts_read_as_the_spec_writes_them() {
        let timeout = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", value.parse().expect("ascii"));
            grpc_timeout(&headers)
        };
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(timeout("750u"), Some(Duration::from_micros(750)));
        assert_eq!(timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
    }
}
