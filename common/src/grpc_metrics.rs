//! Per-method gRPC server metrics, as a tower layer on every server: calls started, calls handled
//! by status code, and handling time, under the names and labels of go-grpc-prometheus
//! (`grpc_server_started_total`, `grpc_server_handled_total`, `grpc_server_handling_seconds`), so
//! the dashboards and alerts written for those work unchanged.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tonic::codegen::http::{HeaderMap, Request};

use crate::around_call::{Answered, AroundCall};
use crate::deadline::{TIMER_TICK, grpc_timeout};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_service: String,
    grpc_method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_service: String,
    grpc_method: String,
    grpc_code: &'static str,
}

/// The server's per-method series; cheap to clone (the families are shared).
#[derive(Debug, Clone)]
pub struct GrpcServerMetrics {
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    handling: Family<MethodLabels, Histogram>,
}

impl Default for GrpcServerMetrics {
    fn default() -> Self {
        Self {
            started: Family::default(),
            handled: Family::default(),
            // 100 µs to ~52 s.
            handling: Family::new_with_constructor(|| Histogram::new(exponential_buckets(1e-4, 2.0, 20))),
        }
    }
}

impl GrpcServerMetrics {
    /// Registers the series at `registry`'s root (the names carry no component prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("grpc_server_started", "RPCs started on the server", self.started.clone());
        registry.register(
            "grpc_server_handled",
            "RPCs completed on the server, by status code (Canceled: the client went away first; DeadlineExceeded: its grpc-timeout passed)",
            self.handled.clone(),
        );
        registry.register_with_unit(
            "grpc_server_handling",
            "Time from a call's arrival until its last byte or status was sent",
            Unit::Seconds,
            self.handling.clone(),
        );
    }
}

/// Counts each call in [`GrpcServerMetrics`].
#[derive(Debug, Clone)]
pub struct RecordCalls(pub GrpcServerMetrics);

impl AroundCall for RecordCalls {
    fn around<B, E: 'static>(
        &self,
        request: Request<B>,
        handle: impl FnOnce(Request<B>) -> Answered<E>,
    ) -> Answered<E> {
        let labels = method_labels(request.uri().path());
        self.0.started.get_or_create(&labels).inc();
        let began = Instant::now();
        let deadline = grpc_timeout(request.headers()).and_then(|timeout| began.checked_add(timeout));
        let mut call = CallRecord { metrics: self.0.clone(), labels, began, deadline, code: None };
        let response = handle(request);
        Box::pin(async move {
            match response.await {
                Ok(response) => {
                    // A trailers-only answer (every error tonic returns) carries its status in
                    // the headers; any other in the trailers at the body's end.
                    call.code = grpc_code(response.headers());
                    Ok(response.map(|body| tonic::body::Body::new(RecordedBody { inner: body, call: Some(call) })))
                }
                Err(error) => {
                    call.code.replace("Internal");
                    Err(error)
                }
            }
        })
    }
}

fn method_labels(path: &str) -> MethodLabels {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    MethodLabels { grpc_service: service.to_owned(), grpc_method: method.to_owned() }
}

fn grpc_code(headers: &HeaderMap) -> Option<&'static str> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(code_name(tonic::Code::from_i32(code)))
}

/// The code as go-grpc-prometheus labels it (Go's `codes.Code.String()`).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// One call's tally, written once, when its answer is done (or dropped: the client went away, or
/// its deadline passed).
struct CallRecord {
    metrics: GrpcServerMetrics,
    labels: MethodLabels,
    began: Instant,
    /// From the call's `grpc-timeout`: a call dropped past it was ended by a deadline (tonic's
    /// timeout layer's, should it fire before [`crate::deadline::AnswerDeadlines`] answers).
    deadline: Option<Instant>,
    code: Option<&'static str>,
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        // Tonic's timer started a moment before this layer saw the call and fires on the runtime
        // timer's millisecond ticks: a call dropped within one tick of its deadline is past it.
        let past_deadline = self.deadline.is_some_and(|deadline| Instant::now() + TIMER_TICK >= deadline);
        let unanswered = if past_deadline { "DeadlineExceeded" } else { "Canceled" };
        let handled = HandledLabels {
            grpc_service: self.labels.grpc_service.clone(),
            grpc_method: self.labels.grpc_method.clone(),
            grpc_code: self.code.unwrap_or(unanswered),
        };
        self.metrics.handled.get_or_create(&handled).inc();
        self.metrics.handling.get_or_create(&self.labels).observe(self.began.elapsed().as_secs_f64());
    }
}

/// The answer's body, passed through; its trailers' status completes the call's record.
struct RecordedBody {
    inner: tonic::body::Body,
    call: Option<CallRecord>,
}

impl Body for RecordedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = self.call.as_mut()
                {
                    call.code = grpc_code(trailers).or(call.code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = self.call.as_mut() {
                    call.code = Some("Internal");
                }
                self.call.take();
            }
            Poll::Ready(None) => {
                // The answer is complete: a stream that ended without a status is Unknown.
                if let Some(call) = self.call.as_mut() {
                    call.code.get_or_insert("Unknown");
                }
                self.call.take();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::BodyExt;
    use tower::{Layer, Service, ServiceExt};

    use super::*;
    use crate::around_call::{Answer, CallLayer};

    /// The count of `grpc_server_handled_total` for `method` and `code`, as Prometheus would read it.
    fn handled(metrics: &GrpcServerMetrics, method: &str, code: &str) -> f64 {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let series = format!(
            "grpc_server_handled_total{{grpc_service=\"test.Service\",grpc_method=\"{method}\",grpc_code=\"{code}\"}} "
        );
        text.lines().find_map(|line| line.strip_prefix(&series)?.parse().ok()).unwrap_or(0.0)
    }

    fn request(method: &str) -> Request<()> {
        Request::builder().uri(format!("/test.Service/{method}")).body(()).expect("request")
    }

    /// An answer whose status comes in the trailers after one frame of data.
    fn answered_in_trailers(code: i32) -> Answer {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", code.to_string().parse().expect("ascii"));
        let frames = futures::stream::iter([
            Ok::<_, tonic::Status>(Frame::data(bytes::Bytes::from_static(b"rows"))),
            Ok(Frame::trailers(trailers)),
        ]);
        Answer::new(tonic::body::Body::new(http_body_util::StreamBody::new(frames)))
    }

    /// What an answer's body tells hyper before its frames (its length, that it is empty) passes
    /// through the record.
    #[tokio::test]
    async fn an_answer_keeps_the_length_and_end_its_body_gave() {
        let inner = tower::service_fn(|request: Request<()>| async move {
            let body = match request.uri().path() {
                "/test.Service/Empty" => tonic::body::Body::empty(),
                _ => tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from_static(b"rows"))),
            };
            Ok::<_, Infallible>(Answer::new(body))
        });
        let mut service = CallLayer(RecordCalls(GrpcServerMetrics::default())).layer(inner);
        let rows = service.ready().await.expect("ready").call(request("Rows")).await.expect("answer");
        assert_eq!((rows.body().size_hint().exact(), rows.body().is_end_stream()), (Some(4), false));
        let empty = service.ready().await.expect("ready").call(request("Empty")).await.expect("answer");
        assert_eq!((empty.body().size_hint().exact(), empty.body().is_end_stream()), (Some(0), true));
    }

    #[tokio::test]
    async fn every_way_a_call_ends_is_counted_under_its_code() {
        let metrics = GrpcServerMetrics::default();
        let inner = tower::service_fn(|request: Request<()>| async move {
            match request.uri().path() {
                "/test.Service/Refused" => {
                    let status = tonic::Status::resource_exhausted("queue full");
                    Ok::<_, Infallible>(status.into_http())
                }
                "/test.Service/Slow" => std::future::pending().await,
                _ => Ok(answered_in_trailers(0)),
            }
        });
        let mut service = CallLayer(RecordCalls(metrics.clone())).layer(inner);

        // An answer read to its end: the trailers' status.
        let answer = service.ready().await.expect("ready").call(request("Forward")).await.expect("answer");
        answer.into_body().collect().await.expect("the whole body");
        assert_eq!(handled(&metrics, "Forward", "OK"), 1.0);

        // A refusal: trailers-only, its status in the headers.
        let refused = service.ready().await.expect("ready").call(request("Refused")).await.expect("answer");
        drop(refused);
        assert_eq!(handled(&metrics, "Refused", "ResourceExhausted"), 1.0);

        // The client went away before the answer, or in the middle of its body.
        let pending = service.ready().await.expect("ready").call(request("Slow"));
        drop(pending);
        assert_eq!(handled(&metrics, "Slow", "Canceled"), 1.0);
        let answer = service.ready().await.expect("ready").call(request("Stream")).await.expect("answer");
        let mut body = answer.into_body();
        body.frame().await.expect("a frame").expect("data");
        drop(body);
        assert_eq!(handled(&metrics, "Stream", "Canceled"), 1.0, "no status reached the client");
        assert_eq!(handled(&metrics, "Stream", "OK"), 0.0);

        // Dropped once its grpc-timeout has passed (what tonic's timeout layer does): past its
        // deadline, not cancelled; dropped before it: cancelled.
        let timed = || {
            let mut timed = request("Slow");
            timed.headers_mut().insert("grpc-timeout", "5m".parse().expect("ascii"));
            timed
        };
        let pending = service.ready().await.expect("ready").call(timed());
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        drop(pending);
        assert_eq!(handled(&metrics, "Slow", "DeadlineExceeded"), 1.0);
        let pending = service.ready().await.expect("ready").call(timed());
        drop(pending);
        assert_eq!(handled(&metrics, "Slow", "Canceled"), 2.0);
        // Dropped less than a timer tick before its deadline: tonic's timer, started a moment
        // before this layer saw the call, has fired.
        let pending = service.ready().await.expect("ready").call(timed());
        std::thread::sleep(std::time::Duration::from_micros(4_200));
        drop(pending);
        assert_eq!(handled(&metrics, "Slow", "DeadlineExceeded"), 2.0);
    }
}
