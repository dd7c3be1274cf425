//! The compute step's span is a child of the first request merged into its batch and linked
//! (`follows_from`) to the others', and names every one's request id, so a trace shows which
//! requests one forward served. Its own test binary: it installs a global subscriber (the compute
//! thread is not the test's thread).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_expert_worker::request::{ExpertRowsIn, ForwardBatch, RowsSource};
use switchyard_expert_worker::scheduler::BatchingConfig;
use switchyard_expert_worker::{ExpertWorker, QueueLimits, WorkerOptions};
use switchyard_model::{ExpertId, ModelSpec};
use switchyard_proto::wire::{self, WireDtype};
use tracing::Instrument;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Every span's name, `request_id` and `request_ids`, its explicit parent, and every follows-from
/// link, by span id.
#[derive(Debug, Default)]
struct Recorded {
    spans: HashMap<u64, (String, Fields)>,
    parents: HashMap<u64, u64>,
    links: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Default)]
struct Recorder(Arc<Mutex<Recorded>>);

#[derive(Debug, Default)]
struct Fields {
    request_id: Option<u64>,
    request_ids: Option<String>,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "request_id" {
            self.request_id = Some(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "request_ids" {
            self.request_ids = Some(format!("{value:?}"));
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Recorder {
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = Fields::default();
        attributes.record(&mut fields);
        let name = attributes.metadata().name().to_owned();
        let mut recorded = self.0.lock().expect("lock");
        recorded.spans.insert(id.into_u64(), (name, fields));
        if let Some(parent) = attributes.parent() {
            recorded.parents.insert(id.into_u64(), parent.into_u64());
        }
    }

    fn on_follows_from(&self, span: &Id, follows: &Id, _: Context<'_, S>) {
        self.0.lock().expect("lock").links.push((span.into_u64(), follows.into_u64()));
    }
}

#[tokio::test]
async fn a_merged_batch_follows_from_every_request_it_serves() {
    let recorder = Recorder::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(recorder.clone()))
        .expect("the only subscriber of this test binary");
    // Long enough a wait that the first request's rows wait for the second's, announced with it.
    let options = WorkerOptions {
        batching: BatchingConfig { batch_wait: Duration::from_millis(300), max_batch_tokens: 1024 },
        default_queue_limit_tokens: 1024,
        ..WorkerOptions::in_process(tch::Device::Cpu)
    };
    let worker = ExpertWorker::start(options, Default::default()).expect("compute thread");
    let model = ModelSpec { d_model: 8, d_ff: 16, experts_per_layer: 2, ..ModelSpec::default_synthetic() };
    worker.load_experts(model, vec![ExpertId::new(0, 0)], QueueLimits::default()).await.expect("load");
    let request = |id: u64| {
        let values: Vec<f32> = (0..2 * 8).map(|i| (i as f32 + id as f32).cos()).collect();
        let part = ExpertRowsIn {
            index: 0,
            expert: ExpertId::new(0, 0),
            dtype: WireDtype::F32,
            tokens: 2,
            width: 8,
            rows: RowsSource::Own(wire::encode_f32(&values, WireDtype::F32)),
        };
        let batch = ForwardBatch { request_id: id, parts: vec![part], output_dtype: None, token_major: None };
        let worker = worker.clone();
        // Announced now, as a request on the wire is from its headers: rows queued first wait for it.
        let arriving = worker.announce();
        async move { worker.forward_arrived(batch, Some(arriving)).await }
            .instrument(tracing::info_span!("request", request_id = id))
    };
    let (first, second) = tokio::join!(request(1), request(2));
    let (first, second) = (first.expect("first"), second.expect("second"));
    assert_eq!((first.outputs[0].batch_tokens, second.outputs[0].batch_tokens), (4, 4), "one merged forward");

    worker.shutdown().await;
    let recorded = recorder.0.lock().expect("lock");
    let batches: Vec<u64> =
        recorded.spans.iter().filter(|(_, (name, _))| name == "expert_batch").map(|(id, _)| *id).collect();
    assert_eq!(batches.len(), 1, "one compute span for the merged batch");
    let request_of = |span: &u64| recorded.spans.get(span).and_then(|(_, fields)| fields.request_id);
    let parent = recorded.parents.get(&batches[0]).expect("the batch's span has a parent");
    let linked = recorded.links.iter().filter(|(span, _)| *span == batches[0]).map(|(_, follows)| follows);
    let mut served: Vec<Option<u64>> = std::iter::once(parent).chain(linked).map(request_of).collect();
    served.sort();
    assert_eq!(served, [Some(1), Some(2)], "a child of one request's span, linked to the other's");
    let named = recorded.spans[&batches[0]].1.request_ids.clone().expect("request_ids recorded");
    let mut named: Vec<&str> = named.split(',').collect();
    named.sort();
    assert_eq!(named, ["1", "2"], "the batch names both request ids");
}
