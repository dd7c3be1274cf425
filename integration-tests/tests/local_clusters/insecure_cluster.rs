//! What `--insecure` gives up, shown on a plaintext cluster: the calls a mutual-TLS cluster refuses
//! by role (`mutual_tls.rs`) are taken from anyone who can reach the ports. An anonymous caller
//! reseeds a worker's experts (every later answer silently wrong, status OK), unloads them,
//! and registers a fake worker that claims 2⁶² bytes; the coordinator lists it. Run such a
//! cluster only on a network you trust.

use switchyard_common::transport;
use switchyard_integration_tests::{TestCluster, attacks, hidden_states, small_model};
use switchyard_model::ModelSpec;
use switchyard_proto::v1::{self, coordinator_client::CoordinatorClient, expert_worker_client::ExpertWorkerClient};
use switchyard_reference::{ReferenceConfig, ReferenceLayer, relative_frobenius_error};
use switchyard_router_client::RoutingOverrides;

#[tokio::test]
async fn an_insecure_cluster_takes_from_anyone_what_a_tls_cluster_refuses() {
    if std::env::var_os("SWITCHYARD_TEST_TLS").is_some_and(|value| value == "1") {
        eprintln!("skipped: SWITCHYARD_TEST_TLS=1 runs every cluster of this suite on mutual TLS");
        return;
    }
    let model = small_model(2.0);
    let cluster = TestCluster::start(model.clone(), 2, |_| {}).await;
    let reference = ReferenceLayer::start(&model, &[0], ReferenceConfig::cpu()).await.expect("reference");
    let hidden = hidden_states(32, 256, 13);
    let expected = reference.forward(0, &hidden, &RoutingOverrides::default()).await.expect("reference forward");
    let error_now = || async {
        let output = cluster.client.forward(0, &hidden).await.expect("answered, status OK");
        relative_frobenius_error(&output.hidden, &expected.hidden)
    };
    assert!(error_now().await < 1e-5, "exact before the attacks");

    // (a) Another seed's weights for every expert, loaded by an anonymous caller into each worker.
    let every_expert: Vec<v1::ExpertKey> =
        (0..model.experts_per_layer).map(|expert| v1::ExpertKey::new(0, expert)).collect();
    let reseeded = v1::LoadExpertsRequest {
        model: Some(ModelSpec { seed: model.seed + 1, ..model.clone() }.to_proto()),
        experts: every_expert.clone(),
        queue_limit_tokens: 4096,
        shared_queue_limit_tokens: 0,
    };
    for worker in &cluster.processes.workers {
        let mut anonymous = ExpertWorkerClient::new(transport::channel(&worker.grpc_uri()).expect("channel"));
        anonymous.load_experts(reseeded.clone()).await.expect("an anonymous LoadExperts is taken");
    }
    let wrong = error_now().await;
    assert!(wrong > 0.1, "every answer silently wrong, status OK: relative error {wrong}");

    // (d), (e) A fake worker registers, claiming 2⁶² bytes: taken and listed.
    let coordinator_uri = cluster.processes.coordinator_uri();
    let mut anonymous = CoordinatorClient::new(transport::channel(&coordinator_uri).expect("channel"));
    anonymous.register_worker(attacks::fake_worker_registration()).await.expect("an anonymous registration is taken");
    let status = anonymous.get_cluster_status(v1::GetClusterStatusRequest {}).await.expect("status").into_inner();
    assert!(status.workers.iter().any(|worker| worker.name == "fake"), "the fake worker is a member");

    // (b) Experts unloaded from under the clients.
    let worker = &cluster.processes.workers[0];
    let mut anonymous = ExpertWorkerClient::new(transport::channel(&worker.grpc_uri()).expect("channel"));
    let unload = v1::UnloadExpertsRequest { experts: every_expert };
    anonymous.unload_experts(unload).await.expect("an anonymous UnloadExperts is taken");
}
