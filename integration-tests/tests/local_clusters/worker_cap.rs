//! `--max-workers` on real processes: a worker started past the cap (an autoscaler set beyond it)
//! is refused, keeps retrying and stays unready (the refusals counted where the chart's alert
//! looks), and takes over once a member dies.

use std::time::Duration;

use switchyard_common::transport;
use switchyard_integration_tests::{TestCluster, hidden_states, http_get, http_get_any, metric_value, small_model};
use switchyard_proto::v1::{self, coordinator_client::CoordinatorClient};
use switchyard_proto::{PROTOCOL_VERSION, status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test]
async fn a_worker_past_the_cap_waits_unready_and_takes_over_when_a_member_dies() {
    let mut cluster = TestCluster::start(small_model(2.0), 1, |config| {
        config.coordinator_args.extend(["--max-workers".to_owned(), "1".to_owned()]);
    })
    .await;
    let hidden = hidden_states(16, 256, 21);
    let before = cluster.client.forward(0, &hidden).await.expect("forward on the first worker");
    let member = cluster.processes.workers[0].grpc_uri();
    let spare = cluster.processes.add_worker().await.expect("a second worker starts");
    let spare_uri = cluster.processes.workers[spare].grpc_uri();

    // Long enough for the spare's first registration (at once) and its first retry (200-400 ms
    // later, with jitter: `switchyard_common::backoff::reconnect`).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let channel = transport::channel(&cluster.processes.coordinator_uri()).expect("channel");
    let mut coordinator = CoordinatorClient::new(channel);
    let status = coordinator.get_cluster_status(v1::GetClusterStatusRequest {}).await.expect("status").into_inner();
    let listed: Vec<_> = status.workers.iter().map(|worker| worker.endpoint.as_str()).collect();
    assert_eq!(listed, [member.as_str()], "the spare is refused while the member lives");
    assert_eq!(status.max_workers, 1);
    // The refusal's details cross the wire as data: what a worker logs, and grpcurl shows.
    let refusal = coordinator
        .register_worker(v1::RegisterWorkerRequest {
            protocol_version: PROTOCOL_VERSION,
            name: "third".into(),
            endpoint: "http://127.0.0.1:9".into(),
            device: "cpu".into(),
            memory_bytes: 1 << 30,
            ..Default::default()
        })
        .await
        .expect_err("a third registration is refused too");
    assert_eq!(refusal.code(), tonic::Code::ResourceExhausted, "{refusal:?}");
    assert_eq!(status::WorkerLimit::from_status(&refusal), Some(status::WorkerLimit { limit: 1 }));
    let health = HealthClient::new(transport::channel(&spare_uri).expect("channel"))
        .check(HealthCheckRequest { service: "switchyard.v1.ExpertWorker".into() })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(health.status, ServingStatus::NotServing as i32, "the spare is not ready: it serves no expert");
    let spare_metrics = cluster.processes.workers[spare].metrics;
    let (code, why) = http_get_any(spare_metrics, "/readyz").await;
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("the coordinator has its most workers (1, its --max-workers)"), "/readyz says why: {why}");
    // The series the chart's SwitchyardWorkerRegistrationsRefused alert watches.
    let metrics = http_get(cluster.processes.coordinator.metrics, "/metrics").await;
    let refused = metric_value(
        &metrics,
        r#"grpc_server_handled_total{grpc_service="switchyard.v1.Coordinator",grpc_method="RegisterWorker",grpc_code="ResourceExhausted"}"#,
    );
    assert!(refused.is_some_and(|count| count >= 1.0), "{refused:?}");
    assert_eq!(metric_value(&metrics, "switchyard_coordinator_max_workers"), Some(1.0), "the cap, for the dashboard");

    cluster.processes.workers[0].kill().await;
    let table = cluster
        .watcher
        .wait_for(
            |table| table.is_complete() && table.workers().iter().all(|w| **w == *spare_uri),
            Duration::from_secs(20),
        )
        .await
        .expect("the spare registered in the dead member's place and took every expert");
    assert_eq!(table.workers().len(), 1);
    let after = cluster.client.forward(0, &hidden).await.expect("forward on the spare");
    let error = switchyard_reference::relative_frobenius_error(&after.hidden, &before.hidden);
    assert!(error < 1e-5, "the same output from the spare: relative error {error:e}");
}
