//! A worker's answers, changed on their way back (a buggy worker, or one of another version): every
//! layer call still ends, with an output of the call's shape or an error that names what was wrong,
//! never a panic or a hang. A call that ends with an output got the true one (within the numerical
//! contract, a relative error under 1e-5: a split call's requests may share the worker's steps
//! differently from run to run), unless the change could pass for a true answer (flipped payload
//! bits); a change to what the client only books (timings, stamps, the handler's time) never fails
//! it. The answers start as real ones, from an in-process worker.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use proptest::prelude::*;
use prost::Message;
use switchyard_expert_worker::ExpertWorker;
use switchyard_model::ModelSpec;
use switchyard_proto::v1;
use switchyard_reference::in_process::InProcessTransport;
use switchyard_reference::relative_frobenius_error;
use switchyard_router_client::transport::{Answer, Endpoint, ExpertTransport};
use switchyard_router_client::{ClientError, ClientOptions, DispatchLayout, MoeClient};
use tokio::sync::watch;

use crate::support;

const TOKENS: usize = 8;

fn model() -> ModelSpec {
    ModelSpec { d_model: 16, d_ff: 32, seed: 11, ..ModelSpec::default_synthetic() }
}

fn hidden() -> Vec<f32> {
    (0..TOKENS * 16).map(|i| ((i as f32) * 0.37).sin()).collect()
}

/// How every answer of a call is changed.
#[derive(Debug, Clone)]
enum Tamper {
    /// Only what the client books: every timing, stamp and the handler's time set to this.
    Bookkeeping(u64),
    CombinedShape(Vec<u64>),
    CombinedDtype(i32),
    CombinedLength(usize),
    CombinedMissing,
    /// Only the first this many outputs kept.
    OutputsKept(usize),
    FirstOutputExpert(u32),
    /// Rows of this shape on every output, as an expert-major answer carries them.
    OutputRows(Vec<u64>),
    /// Every output's rows (expert-major) cut or padded to this many bytes, their shape kept.
    OutputLength(usize),
    /// The encoded answer with these bytes flipped (positions modulo its length), decoded again.
    Flipped(Vec<(usize, u8)>),
}

impl Tamper {
    fn apply(&self, response: &mut v1::ForwardResponse) -> Result<(), String> {
        match self {
            Tamper::Bookkeeping(value) => {
                response.worker_us = *value;
                response.received_unix_nanos = *value;
                response.replied_unix_nanos = *value;
                for timing in response.outputs.iter_mut().filter_map(|output| output.timing.as_mut()) {
                    *timing = v1::ExpertTiming {
                        queue_wait_us: *value,
                        compute_us: *value,
                        batch_tokens: *value as u32,
                        tokens: *value as u32,
                    };
                }
            }
            Tamper::CombinedShape(shape) => response.combined.iter_mut().for_each(|c| c.shape = shape.clone()),
            Tamper::CombinedDtype(dtype) => response.combined.iter_mut().for_each(|c| c.dtype = *dtype),
            Tamper::CombinedLength(length) => response.combined.iter_mut().for_each(|combined| {
                let mut data = combined.data.to_vec();
                data.resize(*length, 0);
                combined.data = data.into();
            }),
            Tamper::CombinedMissing => response.combined = None,
            Tamper::OutputsKept(kept) => response.outputs.truncate(*kept),
            Tamper::FirstOutputExpert(expert) => {
                if let Some(key) = response.outputs.first_mut().and_then(|output| output.expert.as_mut()) {
                    key.expert = *expert;
                }
            }
            Tamper::OutputRows(shape) => {
                let rows =
                    v1::WireTensor { dtype: v1::Dtype::F32 as i32, shape: shape.clone(), data: vec![0; 64].into() };
                response.outputs.iter_mut().for_each(|output| output.rows = Some(rows.clone()));
            }
            Tamper::OutputLength(length) => {
                for rows in response.outputs.iter_mut().filter_map(|output| output.rows.as_mut()) {
                    let mut data = rows.data.to_vec();
                    data.resize(*length, 0);
                    rows.data = data.into();
                }
            }
            Tamper::Flipped(flips) => {
                let mut bytes = response.encode_to_vec();
                if !bytes.is_empty() {
                    let length = bytes.len();
                    flips.iter().for_each(|(position, mask)| bytes[position % length] ^= mask);
                }
                *response = v1::ForwardResponse::decode(bytes.as_slice()).map_err(|error| error.to_string())?;
            }
        }
        Ok(())
    }

    /// Whether the client may take the changed answer for a true one: where the change keeps its
    /// shapes and lengths (rows of the right size, a dtype of the same width, flipped payload bits),
    /// nothing tells them apart. Any other change is refused, or leaves what the client reads alone.
    fn may_pass_for_true(&self) -> bool {
        matches!(self, Tamper::Flipped(_) | Tamper::OutputRows(_) | Tamper::CombinedDtype(_))
    }
}

fn tamper() -> impl Strategy<Value = Tamper> {
    let dim = prop_oneof![Just(0u64), 1..40u64, Just(u64::MAX), Just(1 << 62)];
    prop_oneof![
        prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>()].prop_map(Tamper::Bookkeeping),
        proptest::collection::vec(dim.clone(), 0..4).prop_map(Tamper::CombinedShape),
        (0..6i32).prop_map(Tamper::CombinedDtype),
        prop_oneof![Just(0usize), 1..1024usize].prop_map(Tamper::CombinedLength),
        Just(Tamper::CombinedMissing),
        (0..3usize).prop_map(Tamper::OutputsKept),
        prop_oneof![0..8u32, Just(u32::MAX)].prop_map(Tamper::FirstOutputExpert),
        proptest::collection::vec(dim, 0..4).prop_map(Tamper::OutputRows),
        prop_oneof![Just(0usize), 1..1024usize].prop_map(Tamper::OutputLength),
        proptest::collection::vec((any::<usize>(), 1..=255u8), 1..4).prop_map(Tamper::Flipped),
    ]
}

/// The in-process transport, every answer changed by `tamper` (one that no longer decodes fails
/// as the gRPC transport's decoder would fail it).
#[derive(Debug)]
struct Tampering {
    inner: Arc<InProcessTransport>,
    tamper: Tamper,
}

impl ExpertTransport for Tampering {
    fn forward(
        &self,
        endpoint: &Endpoint,
        request: v1::ForwardRequest,
        deadline: Duration,
    ) -> BoxFuture<'static, Result<Answer, ClientError>> {
        let answered = self.inner.forward(endpoint, request, deadline);
        let (tamper, endpoint) = (self.tamper.clone(), endpoint.to_string());
        Box::pin(async move {
            let mut answer = answered.await?;
            tamper.apply(&mut answer.response).map_err(|reason| ClientError::BadResponse { endpoint, reason })?;
            Ok(answer)
        })
    }
}

/// One worker holding every expert, and the output an untouched call of each sending gets from it.
struct Served {
    runtime: tokio::runtime::Runtime,
    transport: Arc<InProcessTransport>,
    _worker: Arc<ExpertWorker>,
    exact: [Vec<f32>; 3],
}

/// How a call goes to the worker: each layout as one request, and token-major split into requests
/// of a few rows each (this many payload bytes at most), sent as the chunks of one stream, whose
/// answers the client takes one by one.
const SENDINGS: [(DispatchLayout, Option<usize>); 3] =
    [(DispatchLayout::TokenMajor, None), (DispatchLayout::ExpertMajor, None), (DispatchLayout::TokenMajor, Some(128))];

fn served() -> Served {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (transport, worker) = runtime.block_on(support::every_expert_on_a(&model()));
    let exact = SENDINGS.map(|sending| {
        let output = runtime.block_on(call(transport.clone(), sending)).expect("an untouched call ends");
        output.expect("an untouched call succeeds")
    });
    Served { runtime, transport, _worker: worker, exact }
}

/// One layer call through `transport`: its output, its error, or `None` if it did not end in time.
async fn call(
    transport: Arc<dyn ExpertTransport>,
    (dispatch, split): (DispatchLayout, Option<usize>),
) -> Option<Result<Vec<f32>, ClientError>> {
    let table = support::table(&model(), 1, |_| vec!["a"]);
    let (_tables, receiver) = watch::channel(Some(table));
    let defaults = ClientOptions::default();
    let options = ClientOptions {
        dispatch,
        split_request_bytes: split.unwrap_or(defaults.split_request_bytes),
        chunked_dispatch: split.is_some(),
        cpu_threads: 1,
        timeout: Duration::from_secs(5),
        ..defaults
    };
    let client = MoeClient::with_transport(receiver, options, transport);
    let called = tokio::time::timeout(Duration::from_secs(20), client.forward(0, hidden())).await.ok()?;
    Some(called.map(|output| output.hidden))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_changed_answer_ends_the_call_with_an_output_or_a_named_error(tamper in tamper(), sending in 0..3usize) {
        thread_local! { static SERVED: Served = served(); }
        SERVED.with(|served| {
            let transport = Arc::new(Tampering { inner: served.transport.clone(), tamper: tamper.clone() });
            let ended = served.runtime.block_on(call(transport, SENDINGS[sending]));
            let Some(result) = ended else { return Err(TestCaseError::fail("the call did not end")) };
            match result {
                Ok(output) => {
                    prop_assert_eq!(output.len(), TOKENS * 16);
                    // Within the numerical contract, not bit for bit: a split call's requests may
                    // share the worker's steps differently from run to run, and a GEMM over more
                    // rows rounds differently.
                    if !tamper.may_pass_for_true() {
                        let error = relative_frobenius_error(&output, &served.exact[sending]);
                        prop_assert!(error < 1e-5, "a changed answer was taken: relative error {:e}", error);
                    }
                }
                Err(error) => {
                    prop_assert!(!matches!(tamper, Tamper::Bookkeeping(_)), "bookkeeping failed the call: {}", error);
                    let named = matches!(&error, ClientError::BadResponse { endpoint, reason } if endpoint == "a" && !reason.is_empty());
                    prop_assert!(named, "a changed answer is refused as a malformed answer of its worker: {:?}", error);
                }
            }
            Ok(())
        })?;
    }
}
