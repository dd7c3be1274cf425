//! The cluster across distinct hosts on mutual TLS: the coordinator and each worker in a network
//! namespace of its own, each with a certificate the development CA signs at its start, naming
//! the address its host got then. A file of its own because the client's identity is the whole
//! process's. Needs CAP_NET_ADMIN (CI runs as root); without it the test says why and passes.

use std::time::Duration;

use switchyard_common::tls::{self, ClientTls, Role};
use switchyard_common::transport;
use switchyard_integration_tests::{TestCluster, hidden_states, small_model};
use switchyard_loadtest::local_cluster::Hosts;
use switchyard_loadtest::shaped_network::{CongestionControl, ShapedNetwork};
use switchyard_reference::{ReferenceConfig, ReferenceLayer, relative_frobenius_error};
use switchyard_router_client::RoutingOverrides;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn a_cluster_on_separate_hosts_runs_on_mutual_tls_with_a_certificate_per_host() {
    if let Some(reason) = ShapedNetwork::create(CongestionControl::default()).err() {
        eprintln!("skipped: network namespaces are not permitted here ({reason})");
        return;
    }
    let certs = tempfile::tempdir().expect("a folder for the CA");
    tls::write_dev_certs(certs.path(), &["localhost".into(), "127.0.0.1".into()], &[]).expect("a development CA");
    let client_tls = ClientTls::load(tls::dev_files(certs.path(), Role::Client)).expect("the client's certificate");
    tls::use_for_outgoing(client_tls.clone());

    let model = small_model(2.0);
    let cluster = TestCluster::start(model.clone(), 2, |config| {
        config.hosts = Hosts::Namespaces { worker_link: None, congestion: CongestionControl::default() };
        config.dev_tls = Some(certs.path().to_path_buf());
    })
    .await;
    let hosts = cluster.processes.worker_hosts().to_vec();
    for (worker, host) in cluster.processes.workers.iter().zip(&hosts) {
        assert_eq!(worker.grpc.ip(), host.address, "{} listens on its own host's address", worker.name);
    }

    let reference = ReferenceLayer::start(&model, &[0], ReferenceConfig::cpu()).await.expect("reference");
    let hidden = hidden_states(32, 256, 5);
    let expected = reference.forward(0, &hidden, &RoutingOverrides::default()).await.expect("reference forward");
    let distributed = cluster.client.forward(0, &hidden).await.expect("a forward over mutual TLS across hosts");
    let error = relative_frobenius_error(&distributed.hidden, &expected.hidden);
    assert!(error < 1e-5, "relative Frobenius error {error:e}");
    assert_eq!(distributed.workers.len(), 2, "one request to each host");

    // Each worker's certificate names its host's address: dialled there with the CA's client
    // certificate it answers; plaintext gets no answer.
    for worker in &cluster.processes.workers {
        let uri = format!("https://{}", worker.grpc);
        let channel = transport::secure_channel(&uri, Some(&client_tls)).expect("channel");
        let health = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await;
        assert!(health.is_ok(), "{}: {health:?}", worker.name);
        let plaintext = transport::secure_channel(&format!("http://{}", worker.grpc), None).expect("channel");
        let refused = tokio::time::timeout(
            Duration::from_secs(10),
            HealthClient::new(plaintext).check(HealthCheckRequest { service: String::new() }),
        )
        .await;
        assert!(!matches!(refused, Ok(Ok(_))), "{} answered plaintext", worker.name);
    }
}
