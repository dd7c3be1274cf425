//! A cluster of real processes on mutual TLS: its members serve each other and a client-role
//! caller gets exactly the in-process reference's output, while the attacks an anonymous caller
//! used to get away with (a fake `LoadExperts` or `UnloadExperts`, registering or heartbeating as
//! a worker) are refused by role, and callers without a certificate of the cluster's CA get no
//! connection; none of it changes the table or the answers.

use std::path::Path;

use switchyard_common::tls::{self, ClientTls, Role, TlsArgs};
use switchyard_common::transport;
use switchyard_integration_tests::{TestCluster, attacks, hidden_states, small_model};
use switchyard_model::ModelSpec;
use switchyard_proto::PROTOCOL_VERSION;
use switchyard_proto::v1::{self, coordinator_client::CoordinatorClient, expert_worker_client::ExpertWorkerClient};
use switchyard_reference::{ReferenceConfig, ReferenceLayer, relative_frobenius_error};
use switchyard_router_client::RoutingOverrides;
use tonic::Code;

fn identity(dir: &Path, role: Role) -> ClientTls {
    ClientTls::load(tls::dev_files(dir, role)).expect("certificates")
}

fn assert_denied<T: std::fmt::Debug>(answer: Result<T, tonic::Status>, code: Code, naming: &str) {
    let status = answer.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(naming), "{}", status.message());
}

#[tokio::test]
async fn only_members_in_their_roles_are_served() {
    let certs = tempfile::tempdir().expect("temp dir");
    tls::write_dev_certs(certs.path(), &["localhost".into(), "127.0.0.1".into()], &["intruder".into()])
        .expect("certificates");
    // This test process is the cluster's client.
    assert!(tls::use_for_outgoing(identity(certs.path(), Role::Client)));
    let model = small_model(2.0);
    let cluster = TestCluster::start(model.clone(), 2, |config| {
        config.coordinator_args.extend(TlsArgs::flags(&tls::dev_files(certs.path(), Role::Coordinator)));
        config.worker_args.extend(TlsArgs::flags(&tls::dev_files(certs.path(), Role::Worker)));
    })
    .await;
    let reference = ReferenceLayer::start(&model, &[0], ReferenceConfig::cpu()).await.expect("reference");
    let hidden = hidden_states(64, 256, 21);
    let expected = reference.forward(0, &hidden, &RoutingOverrides::default()).await.expect("reference forward");
    let exact = || async {
        let output = cluster.client.forward(0, &hidden).await.expect("a client is served over TLS");
        let error = relative_frobenius_error(&output.hidden, &expected.hidden);
        assert!(error < 1e-5, "relative Frobenius error {error:e}");
    };
    exact().await;
    let version = cluster.table().version;

    let coordinator_uri = cluster.processes.coordinator_uri();
    let worker_uri = cluster.processes.workers[0].grpc_uri();
    let as_role = |uri: &str, role: Role| transport::secure_channel(uri, Some(&identity(certs.path(), role)));
    let mut worker_as_client = ExpertWorkerClient::new(transport::channel(&worker_uri).expect("channel"));
    let mut worker_as_worker = ExpertWorkerClient::new(as_role(&worker_uri, Role::Worker).expect("channel"));
    let mut coordinator_as_client = CoordinatorClient::new(transport::channel(&coordinator_uri).expect("channel"));

    // (a) another seed's weights, (c) one-token queues, loaded by someone other than the coordinator.
    let reseeded = v1::LoadExpertsRequest {
        model: Some(ModelSpec { seed: 7, ..model.clone() }.to_proto()),
        experts: vec![v1::ExpertKey::new(0, 0)],
        queue_limit_tokens: 1,
        shared_queue_limit_tokens: 0,
    };
    let only_coordinator = "only the coordinator role may call this";
    assert_denied(worker_as_client.load_experts(reseeded.clone()).await, Code::PermissionDenied, only_coordinator);
    assert_denied(worker_as_worker.load_experts(reseeded).await, Code::PermissionDenied, only_coordinator);
    // (b) experts unloaded from under the clients.
    let unload = v1::UnloadExpertsRequest { experts: vec![v1::ExpertKey::new(0, 0)] };
    assert_denied(worker_as_client.unload_experts(unload).await, Code::PermissionDenied, only_coordinator);
    // (d), (e) a fake worker registering; (f) heartbeats keeping a dead worker's id alive.
    let only_worker = "only the worker role may call this; the caller's certificate names client";
    assert_denied(
        coordinator_as_client.register_worker(attacks::fake_worker_registration()).await,
        Code::PermissionDenied,
        only_worker,
    );
    let beat =
        v1::HeartbeatRequest { protocol_version: PROTOCOL_VERSION, worker_id: "w1".into(), ..Default::default() };
    assert_denied(coordinator_as_client.heartbeat(beat).await, Code::PermissionDenied, only_worker);
    // Another worker-role certificate cannot speak for a registered worker's id.
    let status = coordinator_as_client.get_cluster_status(v1::GetClusterStatusRequest {}).await.expect("status");
    let worker_id = status.into_inner().workers[0].worker_id.clone();
    let intruder = ClientTls::load(tls::named_worker_files(certs.path(), "intruder")).expect("certificates");
    let mut coordinator_as_intruder =
        CoordinatorClient::new(transport::secure_channel(&coordinator_uri, Some(&intruder)).expect("channel"));
    let beat =
        v1::HeartbeatRequest { protocol_version: PROTOCOL_VERSION, worker_id: worker_id.clone(), ..Default::default() };
    assert_denied(
        coordinator_as_intruder.heartbeat(beat).await,
        Code::PermissionDenied,
        "registered over another certificate",
    );
    let drain = v1::DrainWorkerRequest { protocol_version: PROTOCOL_VERSION, worker_id };
    assert_denied(
        coordinator_as_intruder.drain_worker(drain).await,
        Code::PermissionDenied,
        "registered over another certificate",
    );
    // The table is the clients' to read.
    let table = coordinator_as_client.get_routing_table(v1::GetRoutingTableRequest::default()).await;
    assert_eq!(table.expect("a client reads the table").into_inner().version, version.0);

    // No certificate, or one of another CA: no connection at all.
    let plaintext = CoordinatorClient::new(transport::secure_channel(&coordinator_uri, None).expect("channel"))
        .get_routing_table(v1::GetRoutingTableRequest::default())
        .await;
    assert!(plaintext.is_err(), "a plaintext caller is not served");
    let strangers = tempfile::tempdir().expect("temp dir");
    tls::write_dev_certs(strangers.path(), &["127.0.0.1".into()], &[]).expect("another CA");
    let stranger = transport::secure_channel(&worker_uri, Some(&identity(strangers.path(), Role::Coordinator)));
    let stranger = ExpertWorkerClient::new(stranger.expect("channel")).get_stats(v1::GetStatsRequest {}).await;
    assert_eq!(stranger.expect_err("another CA").code(), Code::Unavailable);

    // Nothing changed: same table, same answers.
    assert_eq!(cluster.table().version, version);
    exact().await;
}
