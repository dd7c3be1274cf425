//! Weights are resident in the dtype the checkpoint stores unless `--dtype` says otherwise: a bf16
//! checkpoint (Mixtral and GPT-OSS ship so) holds exactly its stored bytes on the device, with no
//! f32 copy on the way; asked for f32, the same experts hold twice as many.

use std::path::{Path, PathBuf};
use std::time::Duration;

use switchyard_expert_worker::scheduler::BatchingConfig;
use switchyard_expert_worker::{ExpertWorker, QueueLimits, WorkerOptions};
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::{ExpertId, ModelSpec, WeightDtype};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
}

/// Bytes of the routed experts' tensors as the checkpoint's safetensors headers list them, read
/// without Switchyard's reader: every tensor under `.experts.` and the dtype of each.
fn stored_expert_tensors(dir: &Path) -> (u64, Vec<String>) {
    let (mut bytes, mut dtypes) = (0, Vec::new());
    for entry in std::fs::read_dir(dir).expect("fixture") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default().to_owned();
        if !name.starts_with("model") || !name.ends_with(".safetensors") {
            continue;
        }
        let file = std::fs::read(&path).expect("shard");
        let header_len = u64::from_le_bytes(file[..8].try_into().expect("8 bytes")) as usize;
        let header: serde_json::Value = serde_json::from_slice(&file[8..8 + header_len]).expect("header");
        for (tensor, info) in header.as_object().expect("object") {
            if !tensor.contains(".experts.") {
                continue;
            }
            let offsets = &info["data_offsets"];
            bytes += offsets[1].as_u64().expect("end") - offsets[0].as_u64().expect("start");
            dtypes.push(info["dtype"].as_str().expect("dtype").to_owned());
        }
    }
    dtypes.sort();
    dtypes.dedup();
    (bytes, dtypes)
}

async fn resident_bytes_of(spec: &ModelSpec, dtype: Option<WeightDtype>) -> u64 {
    let options = WorkerOptions {
        batching: BatchingConfig { batch_wait: Duration::ZERO, max_batch_tokens: 1024 },
        default_queue_limit_tokens: 1024,
        dtype,
        ..WorkerOptions::in_process(tch::Device::Cpu)
    };
    let worker = ExpertWorker::start(options, Default::default()).expect("compute thread");
    let every_expert: Vec<ExpertId> = spec
        .moe_layers
        .iter()
        .flat_map(|&layer| (0..spec.experts_per_layer).map(move |expert| ExpertId::new(layer, expert)))
        .collect();
    worker.load_experts(spec.clone(), every_expert, QueueLimits::default()).await.expect("loads");
    let bytes = worker.resident_bytes();
    worker.shutdown().await;
    bytes
}

#[tokio::test]
async fn a_bf16_checkpoint_is_resident_in_exactly_its_stored_bytes() {
    for name in ["mixtral-bf16-tiny", "gpt-oss-tiny"] {
        let dir = fixture(name);
        let spec = Checkpoint::open(&dir).expect("opens").spec;
        let (stored, dtypes) = stored_expert_tensors(&dir);
        assert_eq!(dtypes, ["BF16"], "{name}: every expert tensor is stored bf16");
        assert!(stored > 0, "{name}");
        assert_eq!(resident_bytes_of(&spec, None).await, stored, "{name}: resident in its own dtype");
        assert_eq!(resident_bytes_of(&spec, Some(WeightDtype::Bf16)).await, stored, "{name}: asked for bf16");
        assert_eq!(resident_bytes_of(&spec, Some(WeightDtype::F32)).await, 2 * stored, "{name}: asked for f32");
    }
}

#[tokio::test]
async fn an_f32_checkpoint_can_be_served_in_bf16_at_half_its_bytes() {
    let dir = fixture("mixtral-tiny");
    let spec = Checkpoint::open(&dir).expect("opens").spec;
    let (stored, dtypes) = stored_expert_tensors(&dir);
    assert_eq!(dtypes, ["F32"]);
    assert_eq!(resident_bytes_of(&spec, None).await, stored);
    assert_eq!(resident_bytes_of(&spec, Some(WeightDtype::Bf16)).await * 2, stored);
}
