//! Real checkpoints served by real processes: a coordinator and two workers serving the small
//! checkpoint of every family, started with the default flags, driven by the `switchyard forward`
//! command, reproduce Hugging Face transformers' MoE blocks on inputs where a 1.25 capacity factor
//! would drop; a dropless checkpoint cannot drop; a truncated checkpoint never puts a half-loaded
//! expert into the routing table.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use switchyard_integration_tests::{TestCluster, binaries_dir};
use switchyard_loadtest::local_cluster::{LocalCluster, LocalClusterConfig};
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::safetensors::{TensorFiles, write_f32};
use switchyard_model::{CapacityPolicy, ModelSpec};
use switchyard_proto::v1::{self, coordinator_client::CoordinatorClient};
use switchyard_reference::relative_frobenius_error;
use switchyard_router_client::{ClientError, RoutingOverrides};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name).canonicalize().expect("fixture exists")
}

/// The spec `--checkpoint DIR` alone gives: the architecture's own capacity policy.
fn default_spec(dir: &Path) -> ModelSpec {
    Checkpoint::open(dir).expect("checkpoint").spec
}

/// Runs `switchyard forward` on layer `layer`, returns its stdout and `(out, router_logits)`.
fn switchyard_forward(coordinator: &str, dir: &Path, layer: u32, output: &Path) -> (String, TensorFiles) {
    let result = Command::new(binaries_dir().join("switchyard"))
        .args(["forward", "--coordinator", coordinator, "--layer", &layer.to_string()])
        .arg("--checkpoint")
        .arg(dir)
        .arg("--input")
        .arg(dir.join("expected.safetensors"))
        .arg("--output")
        .arg(output)
        .output()
        .expect("switchyard forward runs");
    let stdout = String::from_utf8_lossy(&result.stdout).into_owned();
    assert!(result.status.success(), "switchyard forward failed: {stdout}{}", String::from_utf8_lossy(&result.stderr));
    (stdout, TensorFiles::open_file(output))
}

/// Serves fixture `name` on two workers computing in `dtype` (`None`: the checkpoint's own) and
/// checks `switchyard forward`'s output of every MoE layer against transformers' within `tolerance`.
async fn serves_like_transformers_in(name: &str, dtype: Option<&str>, tolerance: f64) {
    let dir = fixture(name);
    let spec = default_spec(&dir);
    let cluster = TestCluster::start(spec.clone(), 2, |config| {
        if let Some(dtype) = dtype {
            config.worker_args.extend(["--dtype".to_owned(), dtype.to_owned()]);
        }
    })
    .await;
    assert_eq!(cluster.table().workers().len(), 2);
    let expected = TensorFiles::open_file(&dir.join("expected.safetensors"));
    let tokens = expected.shape("hidden_states").expect("hidden_states")[0];
    let (d_model, experts) = (spec.d_model as usize, spec.experts_per_layer as usize);
    let read = |files: &TensorFiles, tensor: &str, width: usize| {
        files.read_f32(tensor, &[tokens, width]).unwrap_or_else(|error| panic!("{tensor}: {error}"))
    };
    let scratch = tempfile::tempdir().expect("temp dir");
    for &layer in &spec.moe_layers {
        let output = scratch.path().join(format!("layer-{layer}.safetensors"));
        let (stdout, answer) = switchyard_forward(&cluster.processes.coordinator_uri(), &dir, layer, &output);
        let out_error = relative_frobenius_error(
            &read(&answer, "out", d_model),
            &read(&expected, &format!("layers.{layer}.out"), d_model),
        );
        let logits_error = relative_frobenius_error(
            &read(&answer, "router_logits", experts),
            &read(&expected, &format!("layers.{layer}.router_logits"), experts),
        );
        eprintln!("{name} layer {layer}: out error {out_error:.1e}, router_logits error {logits_error:.1e}\n{stdout}");
        assert!(out_error < tolerance, "{name} layer {layer}: out relative error {out_error:e}");
        assert!(logits_error < 1e-5, "{name} layer {layer}: router_logits relative error {logits_error:e}");
        match spec.capacity {
            CapacityPolicy::Dropless => assert!(stdout.contains("(dropless), dropped 0"), "{name}: {stdout}"),
            // Switch Transformers drops what transformers drops: the outputs above agree, zero rows included.
            _ => assert!(!stdout.contains("dropped 0"), "{name}: the skewed inputs overflow its capacity: {stdout}"),
        }
    }
}

/// In f32 every family agrees with transformers' f32 outputs to f32 rounding (bf16 and MXFP4
/// checkpoints' values are exact in f32).
async fn serves_like_transformers(name: &str) {
    serves_like_transformers_in(name, Some("f32"), 1e-5).await;
}

macro_rules! family_tests {
    ($($test:ident => $fixture:literal),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                serves_like_transformers($fixture).await;
            }
        )*
    };
}

family_tests! {
    a_cluster_serving_mixtral_matches_transformers => "mixtral-tiny",
    a_cluster_serving_qwen2_moe_matches_transformers => "qwen2-moe-tiny",
    a_cluster_serving_qwen3_moe_matches_transformers => "qwen3-moe-tiny",
    a_cluster_serving_olmoe_matches_transformers => "olmoe-tiny",
    a_cluster_serving_deepseek_v2_lite_matches_transformers => "deepseek-v2-lite-tiny",
    a_cluster_serving_deepseek_v3_matches_transformers => "deepseek-v3-tiny",
    a_cluster_serving_gpt_oss_matches_transformers => "gpt-oss-tiny",
    a_cluster_serving_gpt_oss_in_mxfp4_matches_transformers => "gpt-oss-mxfp4-tiny",
    a_cluster_serving_granite_moe_matches_transformers => "granitemoe-tiny",
    a_cluster_serving_switch_transformers_matches_transformers => "switch-transformers-tiny",
}

/// Mixtral as it ships, bf16, served with the workers' default dtype: computed in bf16 (the gate in
/// f32 on the client), within bf16's precision of transformers' f32 outputs.
#[tokio::test]
async fn a_cluster_serves_a_bf16_checkpoint_in_bf16_by_default() {
    serves_like_transformers_in("mixtral-bf16-tiny", None, 2e-2).await;
}

/// Every token of a call routed to the same two experts: each takes the whole batch, which the
/// dropless queue limit (the largest batch) admits, so nothing is dropped and every row equals the
/// single-token answer. A call larger than the largest batch is refused with the flag named,
/// never silently cut.
#[tokio::test]
async fn a_dropless_checkpoint_never_drops_even_when_every_token_picks_the_same_experts() {
    let dir = fixture("mixtral-tiny");
    let spec = default_spec(&dir);
    let max_batch = 32;
    let cluster = TestCluster::start(spec.clone(), 2, |config| config.max_batch_tokens = max_batch).await;
    assert_eq!(cluster.table().queue_limit_tokens, max_batch as u32, "dropless: a queue admits the largest batch");
    let d_model = spec.d_model as usize;
    let expected = TensorFiles::open_file(&dir.join("expected.safetensors"));
    let one_token = expected.read_f32("hidden_states", &[32, d_model]).expect("hidden_states")[..d_model].to_vec();
    let single = cluster.client.forward(0, &one_token).await.expect("one token");
    let same_token: Vec<f32> = one_token.repeat(max_batch);
    let crowded = cluster.client.forward(0, &same_token).await.expect("a crowded batch is served");
    assert_eq!(crowded.routing.dropped, 0);
    assert_eq!(crowded.routing.tokens_per_expert.iter().filter(|n| **n == max_batch as u32).count(), 2);
    for row in crowded.hidden.chunks_exact(d_model) {
        assert!(relative_frobenius_error(row, &single.hidden) < 1e-6);
    }
    let too_many = one_token.repeat(max_batch + 1);
    let error = cluster.client.forward(0, &too_many).await.unwrap_err();
    assert!(matches!(error, ClientError::InvalidInput { field: "hidden", .. }), "{error}");
    assert!(error.to_string().contains("--max-batch-tokens"), "{error}");
    let dense = cluster.client.forward(7, &one_token).await.unwrap_err().to_string();
    assert_eq!(dense, "layer: 7 is not a MoE layer of mixtral-tiny; its MoE layers are [0, 1]");
    // The operator may still ask for a capacity; then drops are possible and reported.
    let capped = RoutingOverrides { capacity: Some(CapacityPolicy::Factor(1.25)), ..Default::default() };
    let client = switchyard_router_client::MoeClient::new(
        cluster.watcher.receiver(),
        switchyard_router_client::ClientOptions { routing: capped, ..Default::default() },
    );
    assert!(client.forward(0, &same_token).await.expect("capped call").routing.dropped > 0);
}

/// `switchyard model-info --checkpoint DIR` says what each fixture is: family, numbered MoE layers,
/// experts, shared experts, parameters (counted from the tensors in the model crate's tests) and
/// the capacity policy in force.
#[test]
fn model_info_describes_every_family() {
    for (name, family, layers, capacity) in [
        ("mixtral-tiny", "Mixtral", "[0, 1]", "dropless"),
        ("qwen2-moe-tiny", "Qwen2-MoE", "[0, 2]", "dropless"),
        ("qwen3-moe-tiny", "Qwen3-MoE", "[0, 1]", "dropless"),
        ("olmoe-tiny", "OLMoE", "[0, 1]", "dropless"),
        ("deepseek-v2-lite-tiny", "DeepSeek-V2", "[1, 2]", "dropless"),
        ("deepseek-v3-tiny", "DeepSeek-V3", "[1, 2]", "dropless"),
        ("gpt-oss-tiny", "GPT-OSS", "[0, 1]", "dropless"),
        ("gpt-oss-mxfp4-tiny", "GPT-OSS", "[0, 1]", "dropless"),
        ("granitemoe-tiny", "Granite-MoE", "[0, 1]", "dropless"),
        ("switch-transformers-tiny", "Switch Transformers", "[1, 3]", "expert capacity 10 per expert per sequence"),
    ] {
        let dir = fixture(name);
        let spec = default_spec(&dir);
        let result = Command::new(binaries_dir().join("switchyard"))
            .args(["model-info", "--checkpoint"])
            .arg(&dir)
            .output()
            .expect("switchyard model-info runs");
        let stdout = String::from_utf8_lossy(&result.stdout);
        assert!(result.status.success(), "{name}: {}", String::from_utf8_lossy(&result.stderr));
        let line = |label: &str| {
            stdout
                .lines()
                .find(|line| line.starts_with(label))
                .unwrap_or_else(|| panic!("{name}: no {label} line"))
                .to_owned()
        };
        assert!(line("family").contains(family), "{name}: {stdout}");
        assert!(line("MoE layers").starts_with(&format!("MoE layers     2 {layers}")), "{name}: {stdout}");
        let experts = format!("{} routed per layer, {} shared", spec.experts_per_layer, spec.shared_experts);
        assert!(line("experts").ends_with(&experts), "{name}: {stdout}");
        let (total, active) = spec.moe_parameters();
        assert!(line("parameters").contains(&format!("({total})")), "{name}: {stdout}");
        assert!(line("active/token").contains(&format!("({active})")), "{name}: {stdout}");
        assert!(
            line("capacity").contains(capacity) && line("capacity").ends_with("[the architecture's own]"),
            "{name}"
        );
    }
    let overridden = Command::new(binaries_dir().join("switchyard"))
        .args(["model-info", "--capacity-factor", "1.25", "--checkpoint"])
        .arg(fixture("mixtral-tiny"))
        .output()
        .expect("switchyard model-info runs");
    let stdout = String::from_utf8_lossy(&overridden.stdout);
    assert!(stdout.contains("capacity       capacity factor 1.25") && stdout.contains("[set by flag]"), "{stdout}");
}

/// `switchyard forward` on a `[sequences, tokens, d_model]` input applies Switch Transformers'
/// capacity to each sequence, as transformers does for a batch.
#[tokio::test]
async fn switchyard_forward_of_a_batch_of_sequences_matches_transformers() {
    let dir = fixture("switch-transformers-tiny");
    let spec = default_spec(&dir);
    let cluster = TestCluster::start(spec.clone(), 2, |_| {}).await;
    let expected = TensorFiles::open_file(&dir.join("expected.safetensors"));
    let (d_model, experts) = (spec.d_model as usize, spec.experts_per_layer as usize);
    let batch = expected.shape("batched.hidden_states").expect("a batched input");
    let scratch = tempfile::tempdir().expect("temp dir");
    let input = scratch.path().join("batch.safetensors");
    let hidden = expected.read_f32("batched.hidden_states", &batch).expect("batched input");
    write_f32(&input, &[("hidden_states", batch.clone(), &hidden)]).expect("input written");
    for &layer in &spec.moe_layers {
        let output = scratch.path().join(format!("out-{layer}.safetensors"));
        let result = Command::new(binaries_dir().join("switchyard"))
            .args(["forward", "--coordinator", &cluster.processes.coordinator_uri(), "--layer", &layer.to_string()])
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .output()
            .expect("switchyard forward runs");
        assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
        let answer = TensorFiles::open_file(&output);
        let logits_shape = [batch[0], batch[1], experts];
        let out_error = relative_frobenius_error(
            &answer.read_f32("out", &batch).expect("out has the input's shape"),
            &expected.read_f32(&format!("layers.{layer}.batched.out"), &[batch[0], batch[1], d_model]).expect("out"),
        );
        let logits_error = relative_frobenius_error(
            &answer.read_f32("router_logits", &logits_shape).expect("router_logits [sequences, tokens, experts]"),
            &expected.read_f32(&format!("layers.{layer}.batched.router_logits"), &logits_shape).expect("logits"),
        );
        assert!(out_error < 1e-5 && logits_error < 1e-5, "layer {layer}: errors {out_error:e}, {logits_error:e}");
    }
}

/// `--layer` is the checkpoint's numbering: DeepSeek-V3's layer 0 is dense and refused by name.
#[tokio::test]
async fn switchyard_forward_refuses_a_dense_layer_naming_the_moe_layers() {
    let dir = fixture("deepseek-v3-tiny");
    let cluster = TestCluster::start(default_spec(&dir), 1, |_| {}).await;
    let scratch = tempfile::tempdir().expect("temp dir");
    let input = scratch.path().join("input.safetensors");
    let hidden = vec![0.5f32; 4 * 32];
    write_f32(&input, &[("hidden_states", vec![4, 32], &hidden)]).expect("input written");
    let result = Command::new(binaries_dir().join("switchyard"))
        .args(["forward", "--coordinator", &cluster.processes.coordinator_uri(), "--layer", "0"])
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(scratch.path().join("out.safetensors"))
        .output()
        .expect("switchyard forward runs");
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(stderr.contains("layer: 0 is not a MoE layer of deepseek-v3-tiny; its MoE layers are [1, 2]"), "{stderr}");
}

#[tokio::test]
async fn a_truncated_checkpoint_keeps_its_experts_out_of_the_table() {
    let broken = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(fixture("mixtral-tiny")).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), broken.path().join(entry.file_name())).expect("copy");
    }
    // Truncate every shard holding layer 1's experts.
    let index = std::fs::read_to_string(broken.path().join("model.safetensors.index.json")).expect("index");
    let index: serde_json::Value = serde_json::from_str(&index).expect("index json");
    let mut shards: Vec<&str> = index["weight_map"]
        .as_object()
        .expect("weight_map")
        .iter()
        .filter(|(tensor, _)| tensor.starts_with("model.layers.1.block_sparse_moe.experts."))
        .filter_map(|(_, shard)| shard.as_str())
        .collect();
    shards.sort();
    shards.dedup();
    for shard in shards {
        let shard = broken.path().join(shard);
        let length = std::fs::metadata(&shard).expect("shard").len();
        std::fs::OpenOptions::new().write(true).open(&shard).expect("open").set_len(length / 2).expect("truncate");
    }
    let spec = default_spec(broken.path());

    let mut config = LocalClusterConfig::next_to(&binaries_dir().join("switchyard"), spec, 1);
    config.heartbeat_interval = Duration::from_millis(200);
    let cluster = LocalCluster::start(config).await.expect("processes start");
    let channel = switchyard_common::transport::channel(&cluster.coordinator_uri()).expect("channel");
    let mut coordinator = CoordinatorClient::new(channel);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = coordinator.get_cluster_status(v1::GetClusterStatusRequest {}).await.expect("status").into_inner();
    let table = coordinator.get_routing_table(v1::GetRoutingTableRequest::default()).await.expect("table").into_inner();
    assert_eq!(status.workers.len(), 1, "the worker registered");
    assert!(status.workers[0].compute_gflops > 0.0, "the worker measured its matmul rate, for placement to weigh");
    assert!(status.workers[0].experts.is_empty(), "a failed load is not published: {:?}", status.workers[0].experts);
    assert_eq!(status.unplaced_experts.len(), 8, "both layers' 4 experts wait unplaced");
    assert!(table.routes.iter().all(|route| route.endpoints.is_empty()), "no half-loaded worker in the table");
}
