//! Real checkpoints served by real processes: a coordinator and two workers serving the small
//! Mixtral and Qwen2-MoE fixtures reproduce Hugging Face transformers' outputs; a truncated
//! checkpoint never puts a half-loaded expert into the routing table.

use std::path::{Path, PathBuf};
use std::time::Duration;

use switchyard_integration_tests::{TestCluster, binaries_dir};
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::safetensors::TensorFiles;
use switchyard_proto::v1::{self, coordinator_client::CoordinatorClient};
use switchyard_router_client::local_cluster::{LocalCluster, LocalClusterConfig};
use switchyard_router_client::{ClientOptions, MoeClient, RoutingOverrides, relative_frobenius_error};

const TOKENS: usize = 16;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name).canonicalize().expect("fixture exists")
}

async fn serves_like_transformers(name: &str) {
    let dir = fixture(name);
    let spec = Checkpoint::open(&dir).expect("checkpoint").spec;
    let cluster = TestCluster::start(spec.clone(), 2, |_| {}).await;
    assert_eq!(cluster.table().workers().len(), 2);
    // transformers applies no capacity: a capacity factor of E/k makes room for every assignment.
    let routing = RoutingOverrides {
        capacity_factor: Some(spec.experts_per_layer as f32 / spec.top_k as f32),
        ..Default::default()
    };
    let client = MoeClient::new(cluster.watcher.receiver(), ClientOptions { routing, ..ClientOptions::default() });
    let expected = TensorFiles::open_file(&dir.join("expected.safetensors"));
    let read =
        |tensor: &str, width: u32| expected.read_f32(tensor, &[TOKENS, width as usize]).expect("expected tensor");
    let hidden = read("hidden_states", spec.d_model);
    for layer in 0..spec.layers {
        let output = client.forward(layer, &hidden).await.expect("distributed forward");
        let out_error = relative_frobenius_error(&output.hidden, &read(&format!("layers.{layer}.out"), spec.d_model));
        let logits = read(&format!("layers.{layer}.router_logits"), spec.experts_per_layer);
        let logits_error = relative_frobenius_error(&output.router_logits, &logits);
        assert!(out_error < 1e-5, "{name} layer {layer}: out relative error {out_error:e}");
        assert!(logits_error < 1e-5, "{name} layer {layer}: router_logits relative error {logits_error:e}");
    }
}

#[tokio::test]
async fn a_cluster_serving_mixtral_matches_transformers() {
    serves_like_transformers("mixtral-tiny").await;
}

#[tokio::test]
async fn a_cluster_serving_qwen2_moe_matches_transformers() {
    serves_like_transformers("qwen2-moe-tiny").await;
}

#[tokio::test]
async fn a_truncated_checkpoint_keeps_its_experts_out_of_the_table() {
    let broken = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(fixture("mixtral-tiny")).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), broken.path().join(entry.file_name())).expect("copy");
    }
    let shard = broken.path().join("model-00002-of-00002.safetensors");
    let length = std::fs::metadata(&shard).expect("shard").len();
    std::fs::OpenOptions::new().write(true).open(&shard).expect("open").set_len(length / 2).expect("truncate");
    let spec = Checkpoint::open(broken.path()).expect("config.json and the index are intact").spec;

    let mut config = LocalClusterConfig::next_to(&binaries_dir().join("switchyard"), spec, 1);
    config.heartbeat_interval = Duration::from_millis(200);
    let cluster = LocalCluster::start(config).await.expect("processes start");
    let channel = switchyard_common::transport::channel(&cluster.coordinator_uri()).expect("channel");
    let mut coordinator = CoordinatorClient::new(channel);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = coordinator.get_cluster_status(v1::GetClusterStatusRequest {}).await.expect("status").into_inner();
    let table =
        coordinator.get_routing_table(v1::GetRoutingTableRequest { newer_than: 0 }).await.expect("table").into_inner();
    assert_eq!(status.workers.len(), 1, "the worker registered");
    assert!(status.workers[0].experts.is_empty(), "a failed load is not published: {:?}", status.workers[0].experts);
    assert_eq!(status.unplaced_experts.len(), 8, "both layers' 4 experts wait unplaced");
    assert!(table.routes.iter().all(|route| route.endpoints.is_empty()), "no half-loaded worker in the table");
}
