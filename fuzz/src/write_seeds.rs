//! Writes each fuzz target's seed corpus (`fuzz/corpus/<target>/`): valid inputs the fuzzer starts
//! from. `cargo run --release --features seeds --bin write-seeds` in `fuzz/`; the seeds are committed.

use std::path::Path;

use prost::Message;
use switchyard_model::ModelSpec;
use switchyard_proto::v1;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("the corpus folder");
    std::fs::write(dir.join(name), bytes).expect("a seed");
}

fn main() {
    for (name, spec) in [
        ("synthetic", ModelSpec { d_model: 64, d_ff: 128, experts_per_layer: 8, ..ModelSpec::default_synthetic() }),
        ("three-layers", ModelSpec::default_synthetic().with_layers(3)),
    ] {
        write("model_spec", name, &spec.to_proto().encode_to_vec());
    }

    let scratch = std::env::temp_dir().join(format!("switchyard-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("a scratch folder");
    let file = scratch.join("seed.safetensors");
    let values = [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0];
    switchyard_model::safetensors::write_f32(&file, &[("w", vec![2, 3], &values), ("b", vec![3], &values[..3])])
        .expect("the seed file");
    write("safetensors_file", "two-tensors", &std::fs::read(&file).expect("the seed file"));
    std::fs::remove_dir_all(&scratch).expect("remove the scratch folder");

    let index = r#"{"metadata":{"total_size":36},"weight_map":{"w":"model-00001-of-00001.safetensors","b":"model-00001-of-00001.safetensors"}}"#;
    write("safetensors_index", "one-shard", index.as_bytes());

    for entry in std::fs::read_dir(switchyard_fuzz::fixtures()).expect("the fixtures") {
        let config = entry.expect("an entry").path().join("config.json");
        if let Ok(bytes) = std::fs::read(&config) {
            let family = config.parent().and_then(Path::file_name).expect("a fixture name");
            write("config_json", &family.to_string_lossy(), &bytes);
        }
    }

    let rows = |tokens: u64| v1::WireTensor {
        dtype: v1::Dtype::Bf16 as i32,
        shape: vec![tokens, 64],
        data: (0..tokens * 128).map(|byte| byte as u8).collect::<Vec<u8>>().into(),
    };
    let words = |values: &[u32]| values.iter().flat_map(|value| value.to_le_bytes()).collect::<Vec<u8>>().into();
    let request = v1::ForwardRequest {
        request_id: 7,
        tokens: Some(v1::TokenRows {
            layer: 0,
            rows: Some(rows(2)),
            offsets: words(&[0, 2, 3]),
            experts: words(&[1, 5, 1]),
            weights: [0.25f32, 0.75, 1.0].iter().flat_map(|weight| weight.to_le_bytes()).collect::<Vec<u8>>().into(),
        }),
        ..Default::default()
    };
    let answer = v1::ForwardResponse { request_id: 7, combined: Some(rows(2)), ..Default::default() };
    // Three frames cut inside the small fields and across the rows, then the rest.
    for (name, message) in
        [("token-rows-request", request.encode_to_vec()), ("combined-answer", answer.encode_to_vec())]
    {
        let mut input = vec![3, 9, 40, 200];
        input.extend(message);
        write("forward_frames", name, &input);
    }
}
