//! Panics (bugs) met while serving a call: what a caught panic said, and a server layer that
//! answers a call whose handler panicked with INTERNAL naming the panic, where hyper would reset
//! the stream (which tonic's clients read as CANCELLED, a code callers retry elsewhere).

use std::any::Any;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use tonic::codegen::http::Request;

use crate::around_call::{Answered, AroundCall};

/// The message of a panic's payload: `panic!`'s text (a `&str` or a `String`), else `otherwise`.
pub fn message(payload: &(dyn Any + Send), otherwise: &str) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|text| (*text).to_owned()))
        .unwrap_or_else(|| otherwise.to_owned())
}

/// Answers INTERNAL for a call whose handler panics before its answer's head, and logs the panic
/// with the method. A streaming answer's later messages are outside it (their streams are polled by
/// hyper); the worker's `ForwardStream` answers each request's panic itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnswerPanics;

impl AroundCall for AnswerPanics {
    fn around<B, E: 'static>(
        &self,
        request: Request<B>,
        handle: impl FnOnce(Request<B>) -> Answered<E>,
    ) -> Answered<E> {
        let method = request.uri().path().to_owned();
        let answer = handle(request);
        Box::pin(AssertUnwindSafe(answer).catch_unwind().map(move |answered| {
            answered.unwrap_or_else(|panic| {
                let reason = message(&*panic, "a panic");
                tracing::error!(%method, %reason, "handling a call panicked");
                let status = tonic::Status::internal(format!("the server panicked handling {method}: {reason}"));
                Ok(status.into_http())
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::panic::catch_unwind;

    use tower::{Layer, Service, ServiceExt};

    use super::*;
    use crate::around_call::{Answer, CallLayer};

    #[test]
    fn a_panics_text_is_its_message_whether_formatted_or_not() {
        let formatted = catch_unwind(|| panic!("index {} out of bounds", 3)).unwrap_err();
        assert_eq!(message(&*formatted, "a panic"), "index 3 out of bounds");
        let literal = catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(message(&*literal, "a panic"), "plain");
        let other = catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(message(&*other, "a panic"), "a panic");
    }

    /// A handler that panics is answered INTERNAL (13) naming the method and the panic; one that
    /// answers is passed through as it is, and the service goes on answering after a panic.
    #[tokio::test]
    async fn a_call_whose_handler_panics_is_answered_internal_naming_it() {
        let inner = tower::service_fn(|request: Request<()>| async move {
            if request.uri().path().ends_with("Broken") {
                let empty: Vec<u8> = Vec::new();
                let _ = empty[std::hint::black_box(0)];
            }
            Ok::<_, Infallible>(tonic::Status::ok("answered").into_http())
        });
        let mut service = CallLayer(AnswerPanics).layer(inner);
        let call = |path: &str| Request::builder().uri(path).body(()).expect("request");
        let grpc_status = |response: &Answer| {
            let header =
                |name: &str| response.headers().get(name).map(|value| value.to_str().expect("ascii").to_owned());
            (header("grpc-status").expect("a status"), header("grpc-message").unwrap_or_default())
        };

        let broken = service.ready().await.expect("ready").call(call("/test.Service/Broken")).await.expect("an answer");
        let (code, message) = grpc_status(&broken);
        assert_eq!(code, "13", "{message}");
        let message = percent_decoded(&message);
        assert!(
            message.starts_with("the server panicked handling /test.Service/Broken: index out of bounds"),
            "{message}"
        );
        let fine = service.ready().await.expect("ready").call(call("/test.Service/Fine")).await.expect("an answer");
        assert_eq!(grpc_status(&fine).0, "0");
    }

    /// gRPC's `grpc-message` percent-encoding, undone (the messages here are ASCII).
    fn percent_decoded(encoded: &str) -> String {
        let mut decoded = Vec::new();
        let mut bytes = encoded.bytes();
        while let Some(byte) = bytes.next() {
            if byte == b'%' {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                decoded.push(u8::from_str_radix(&hex, 16).expect("two hex digits"));
            } else {
                decoded.push(byte);
            }
        }
        String::from_utf8(decoded).expect("utf-8")
    }
}
