//! A layer call routes around a failed worker, over real in-process workers: rows sent to a worker
//! that is gone go to another holder of their experts, or wait for the table that moves them; the
//! output still equals the reference. A full queue with no other holder fails at once, and a
//! caller that retries failures in a loop never starves the task that brings the repaired table.

use std::sync::Arc;
use std::time::Duration;

use switchyard_expert_worker::{ExpertWorker, ExpertWorkerService};
use switchyard_model::{ExpertId, ModelSpec};
use switchyard_reference::in_process::InProcessTransport;
use switchyard_reference::{ReferenceConfig, ReferenceLayer, relative_frobenius_error};
use switchyard_router_client::{
    ClientError, ClientOptions, DispatchLayout, MoeClient, RefusalPolicy, RoutingOverrides, RoutingTableView,
};
use tokio::sync::watch;

use crate::support;

fn model() -> ModelSpec {
    ModelSpec { d_model: 16, d_ff: 32, seed: 11, ..ModelSpec::default_synthetic() }
}

fn hidden(tokens: usize) -> Vec<f32> {
    (0..tokens * 16).map(|i| ((i as f32) * 0.37).sin()).collect()
}

/// A worker holding every expert of [`model`] behind queues of `limit` tokens.
async fn worker(limit: usize) -> Arc<ExpertWorker> {
    support::cpu_worker(model(), (0..8).map(|expert| ExpertId::new(0, expert)).collect(), limit, Duration::ZERO).await
}

/// A table of version `version` whose expert `e` is served by `holders(e)`.
fn table(version: u64, holders: impl Fn(u32) -> Vec<&'static str>) -> Arc<RoutingTableView> {
    support::table(&model(), version, holders)
}

/// A client over in-process workers `a` and `b` (each holding every expert); "gone" is in the
/// tables but not in this process, as a killed worker would be.
async fn client(
    first: Arc<RoutingTableView>,
    options: ClientOptions,
) -> (MoeClient, watch::Sender<Option<Arc<RoutingTableView>>>, Vec<Arc<ExpertWorker>>) {
    let workers = vec![worker(1 << 20).await, worker(1 << 20).await];
    let transport = InProcessTransport::new([
        (Arc::from("a"), ExpertWorkerService::new(workers[0].clone(), "a")),
        (Arc::from("b"), ExpertWorkerService::new(workers[1].clone(), "b")),
    ]);
    let (tables, receiver) = watch::channel(Some(first));
    (MoeClient::with_transport(receiver, options, Arc::new(transport)), tables, workers)
}

async fn reference_output(tokens: usize) -> Vec<f32> {
    let reference = ReferenceLayer::start(&model(), &[0], ReferenceConfig::cpu()).await.expect("reference");
    let output = reference.forward(0, hidden(tokens), &RoutingOverrides::default()).await.expect("reference call");
    reference.shutdown().await;
    output.hidden
}

#[tokio::test]
async fn rows_for_a_gone_worker_go_to_another_holder_and_the_output_is_exact() {
    let expected = reference_output(64).await;
    for dispatch in [DispatchLayout::TokenMajor, DispatchLayout::ExpertMajor] {
        // Every expert has "gone" as one holder, and a or b as the other.
        let replicated = table(1, |expert| vec!["gone", if expert % 2 == 0 { "a" } else { "b" }]);
        let (client, _tables, workers) =
            client(replicated, ClientOptions { dispatch, ..ClientOptions::default() }).await;
        let mut retried = 0;
        for _ in 0..4 {
            let output = client.forward(0, hidden(64)).await.expect("the call routes around the gone worker");
            let error = relative_frobenius_error(&output.hidden, &expected);
            assert!(error < 1e-5, "{dispatch:?}: relative error {error:e}");
            assert!(output.workers.iter().all(|call| &*call.endpoint != "gone" || call.rows == 0 || call.requests > 0));
            // The rows sent again are booked at the holders that answered them, as many as came back.
            for call in output.workers.iter().filter(|call| &*call.endpoint != "gone") {
                assert_eq!(call.bytes.payload_received, (call.rows * 16 * 4) as u64, "{dispatch:?}: {call:?}");
            }
            retried += output.retried_requests;
        }
        // Ties between holders rotate by call: some calls tried "gone" first, and after a failure it
        // is avoided, so at least one and at most a few requests were sent again.
        assert!(retried >= 1, "{dispatch:?}: gone was never tried");
        for worker in workers {
            worker.shutdown().await;
        }
    }
}

#[tokio::test]
async fn rows_whose_only_holder_is_gone_wait_for_the_table_that_moves_them() {
    let expected = reference_output(32).await;
    let (client, tables, workers) = client(table(1, |_| vec!["gone"]), ClientOptions::default()).await;
    let repaired = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tables.send_replace(Some(table(2, |_| vec!["a"])));
        tables
    });
    let output = client.forward(0, hidden(32)).await.expect("the call waits for the repaired table");
    assert!(relative_frobenius_error(&output.hidden, &expected) < 1e-5);
    assert!(output.retried_requests >= 1);
    assert_eq!(output.table_version.0, 2, "answered on the repaired table");
    let _tables = repaired.await.expect("repair task");
    for worker in workers {
        worker.shutdown().await;
    }
}

#[tokio::test]
async fn a_full_queue_with_no_other_holder_fails_the_call_at_once() {
    let tiny = worker(1).await;
    let transport = InProcessTransport::new([(Arc::from("tiny"), ExpertWorkerService::new(tiny.clone(), "tiny"))]);
    let (_tables, receiver) = watch::channel(Some(table(1, |_| vec!["tiny"])));
    let options = ClientOptions { timeout: Duration::from_secs(3600), ..ClientOptions::default() };
    let client = MoeClient::with_transport(receiver, options, Arc::new(transport));
    // A guard against waiting out the hour-long deadline for a table, not a measurement.
    let failed = tokio::time::timeout(Duration::from_secs(60), client.forward(0, hidden(64)))
        .await
        .expect("the call did not wait for another table");
    assert!(matches!(failed, Err(ClientError::QueueFull { ref endpoint, .. }) if endpoint == "tiny"), "{failed:?}");
    tiny.shutdown().await;
}

/// A refusal with no other holder ends the call at once: it does not wait for the other worker's
/// half, whose requests are cancelled (and so never computed).
#[tokio::test]
async fn a_refusal_without_another_holder_does_not_wait_for_the_other_workers() {
    let tiny = worker(1).await;
    let workers = InProcessTransport::new([(Arc::from("tiny"), ExpertWorkerService::new(tiny.clone(), "tiny"))]);
    let transport = support::Observed::new(workers, Some("stalled"));
    let split = table(1, |expert| vec![if expert % 2 == 0 { "stalled" } else { "tiny" }]);
    let (_tables, receiver) = watch::channel(Some(split));
    let options = ClientOptions { timeout: Duration::from_secs(7200), ..ClientOptions::default() };
    let client = MoeClient::with_transport(receiver, options, Arc::new(transport));
    // A guard against waiting for the stalled worker's two hours, not a measurement.
    let failed = tokio::time::timeout(Duration::from_secs(60), client.forward(0, hidden(64)))
        .await
        .expect("the call ended without waiting for the stalled worker");
    assert!(matches!(failed, Err(ClientError::QueueFull { ref endpoint, .. }) if endpoint == "tiny"), "{failed:?}");
    tiny.shutdown().await;
}

/// A stalled worker is given up when some expert has another holder; but rows whose experts it
/// alone holds have nowhere else to go, and no new table is coming for a worker that is still
/// registered: the call ends with the stall, at the attempt's timeout, not the call's deadline.
#[tokio::test]
async fn rows_only_a_stalled_worker_holds_end_the_call_at_the_attempt_timeout() {
    let a = worker(1 << 20).await;
    let workers = InProcessTransport::new([(Arc::from("a"), ExpertWorkerService::new(a.clone(), "a"))]);
    let transport = support::Observed::new(workers, Some("stalled"));
    let holders = table(1, |expert| match expert {
        0 => vec!["a", "stalled"],
        _ if expert % 2 == 0 => vec!["a"],
        _ => vec!["stalled"],
    });
    let (_tables, receiver) = watch::channel(Some(holders));
    let attempt = Duration::from_millis(200);
    let options = ClientOptions {
        timeout: Duration::from_secs(7200),
        attempt_timeout: Some(attempt),
        ..ClientOptions::default()
    };
    let client = MoeClient::with_transport(receiver, options, Arc::new(transport));
    // A guard against waiting for a table until the two-hour deadline, not a measurement.
    let failed = tokio::time::timeout(Duration::from_secs(60), client.forward(0, hidden(64)))
        .await
        .expect("the call ended without waiting for another table");
    let expected = ClientError::Timeout { endpoint: "stalled".into(), after: attempt };
    assert!(matches!(&failed, Err(error) if *error == expected), "{failed:?}");
    a.shutdown().await;
}

/// With the overflow policy a full queue is the MoE meaning of a full expert: its assignments are
/// refused, counted, and their tokens keep only the other experts' outputs; every other token's
/// output is the reference's.
#[tokio::test]
async fn refused_assignments_overflow_when_the_policy_says_so() {
    let reference = ReferenceLayer::start(&model(), &[0], ReferenceConfig::cpu()).await.expect("reference");
    // Rows that spread over the experts (the smooth `hidden` rows favour a few).
    let varied: Vec<f32> = (0..64 * 16).map(|i| ((i as f32 * 12.9898).sin() * 43758.545).fract() * 2.0).collect();
    let expected = reference.forward(0, varied.clone(), &RoutingOverrides::default()).await.expect("reference call");
    reference.shutdown().await;
    let (transport, even_odd, [served, tiny]) = support::roomy_and_full(&model()).await;
    let (_tables, receiver) = watch::channel(Some(even_odd));
    let options = ClientOptions { refusal: RefusalPolicy::Overflow, ..ClientOptions::default() };
    let client = MoeClient::with_transport(receiver, options, transport);
    let output = client.forward(0, varied).await.expect("refusals overflow instead of failing the call");

    let odd_kept: u32 = expected.routing.tokens_per_expert.iter().skip(1).step_by(2).sum();
    assert!(odd_kept > 0);
    assert_eq!(output.routing.refused, odd_kept as usize, "every kept assignment to an odd expert was refused");
    assert!(output.routing.tokens_per_expert.iter().skip(1).step_by(2).all(|kept| *kept == 0));
    // Tokens whose top-2 are both even experts never touched the full worker: their rows match.
    let mut clean = 0;
    for (token, logits) in expected.router_logits.chunks_exact(8).enumerate() {
        let mut order: Vec<usize> = (0..8).collect();
        order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
        if order[..2].iter().all(|expert| expert % 2 == 0) {
            clean += 1;
            let rows = token * 16..(token + 1) * 16;
            let error = relative_frobenius_error(&output.hidden[rows.clone()], &expected.hidden[rows]);
            assert!(error < 1e-5, "token {token}: {error:e}");
        }
    }
    assert!(clean > 0, "some tokens chose only even experts");
    served.shutdown().await;
    tiny.shutdown().await;
}

/// A full queue is one expert's, on a worker that answered: its rows go to another holder for
/// that call only, and the next call still sends the worker its share.
#[tokio::test]
async fn a_refusal_moves_rows_for_its_call_only() {
    let reference = ReferenceLayer::start(&model(), &[0], ReferenceConfig::cpu()).await.expect("reference");
    let expected_64 = reference.forward(0, hidden(64), &RoutingOverrides::default()).await.expect("reference call");
    let expected_1 = reference.forward(0, hidden(1), &RoutingOverrides::default()).await.expect("reference call");
    reference.shutdown().await;
    let (small, roomy) = (worker(4).await, worker(1 << 20).await);
    let transport = InProcessTransport::new([
        (Arc::from("small"), ExpertWorkerService::new(small.clone(), "small")),
        (Arc::from("roomy"), ExpertWorkerService::new(roomy.clone(), "roomy")),
    ]);
    let (_tables, receiver) = watch::channel(Some(table(1, |_| vec!["small", "roomy"])));
    let client = MoeClient::with_transport(receiver, ClientOptions::default(), Arc::new(transport));
    let refused = client.forward(0, hidden(64)).await.expect("the refused rows go to the roomy holder");
    assert!(refused.retried_requests > 0, "64 tokens overflow 4-token queues");
    assert!(relative_frobenius_error(&refused.hidden, &expected_64.hidden) < 1e-5);
    // One token, two experts: one on each holder, the small one included.
    let next = client.forward(0, hidden(1)).await.expect("one token fits");
    let rows_to = |endpoint: &str| {
        next.workers.iter().filter(|call| &*call.endpoint == endpoint).map(|call| call.rows).sum::<usize>()
    };
    assert_eq!((rows_to("small"), rows_to("roomy")), (1, 1), "{:?}", next.workers);
    assert!(relative_frobenius_error(&next.hidden, &expected_1.hidden) < 1e-5);
    small.shutdown().await;
    roomy.shutdown().await;
}

/// Rows every holder of their experts refused: the call's end under the fail policy; under the
/// overflow policy they overflow, as a refusal with one holder does.
#[tokio::test]
async fn rows_every_holder_refused_follow_the_refusal_policy() {
    let expected = ReferenceLayer::start(&model(), &[0], ReferenceConfig::cpu()).await.expect("reference");
    let kept: u32 = expected
        .forward(0, hidden(64), &RoutingOverrides::default())
        .await
        .expect("reference call")
        .routing
        .tokens_per_expert
        .iter()
        .sum();
    expected.shutdown().await;
    let (full_a, full_b) = (worker(1).await, worker(1).await);
    let transport = Arc::new(InProcessTransport::new([
        (Arc::from("a"), ExpertWorkerService::new(full_a.clone(), "a")),
        (Arc::from("b"), ExpertWorkerService::new(full_b.clone(), "b")),
    ]));
    let (_tables, receiver) = watch::channel(Some(table(1, |_| vec!["a", "b"])));
    let failing = MoeClient::with_transport(receiver.clone(), ClientOptions::default(), transport.clone());
    let failed = failing.forward(0, hidden(64)).await;
    assert!(matches!(failed, Err(ClientError::QueueFull { .. })), "{failed:?}");

    let options = ClientOptions { refusal: RefusalPolicy::Overflow, ..ClientOptions::default() };
    let overflowing = MoeClient::with_transport(receiver, options, transport);
    let output = overflowing.forward(0, hidden(64)).await.expect("refusals overflow instead of failing the call");
    assert_eq!(output.routing.refused, kept as usize, "every kept assignment was refused by both holders");
    assert!(output.hidden.iter().all(|value| *value == 0.0), "no expert output is left to any token");
    full_a.shutdown().await;
    full_b.shutdown().await;
}

/// On a one-thread runtime, a caller retrying `NoTable` failures in a tight loop still lets the
/// task that installs the table run: each failure yields.
#[test]
fn a_busy_retrying_caller_sees_the_table_when_it_comes() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let served = worker(1 << 20).await;
        let transport = InProcessTransport::new([(Arc::from("a"), ExpertWorkerService::new(served.clone(), "a"))]);
        let (tables, receiver) = watch::channel(None);
        let client = MoeClient::with_transport(receiver, ClientOptions::default(), Arc::new(transport));
        let installer = tokio::spawn(async move {
            tables.send_replace(Some(table(1, |_| vec!["a"])));
            tables
        });
        let mut failures = 0u64;
        loop {
            match client.forward(0, hidden(8)).await {
                Ok(_) => break,
                Err(ClientError::NoTable { .. }) if failures < 1_000_000 => failures += 1,
                Err(error) => panic!("after {failures} failures: {error}"),
            }
        }
        assert!(failures >= 1, "the first call ran before the installer");
        let _tables = installer.await.expect("installer");
        served.shutdown().await;
    });
}
