//! Fuzz targets for the model's outside inputs: `ModelSpec` messages, safetensors files and
//! `config.json`. Each case is a valid input with a few bytes changed, inserted or cut, or plain
//! random bytes; each must come back as a value or an error, never a panic, a hang or an
//! allocation it did not check. Runs in the test command; `PROPTEST_CASES` scales it.

use std::path::Path;

use proptest::prelude::*;
use prost::Message;
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::fuzzing::{mutated, random_bytes};
use switchyard_model::safetensors::{TensorFiles, write_f32};
use switchyard_model::spec::limits;
use switchyard_model::{ModelSpec, WeightDtype};

fn hostile(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![4 => mutated(seed), 1 => random_bytes()]
}

fn spec_seed() -> Vec<u8> {
    let spec = ModelSpec { d_model: 64, d_ff: 128, experts_per_layer: 8, ..ModelSpec::default_synthetic() };
    spec.with_layers(3).to_proto().encode_to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn model_specs_from_the_wire_are_bounded_or_refused(bytes in hostile(spec_seed())) {
        let Ok(wire) = switchyard_proto::v1::ModelSpec::decode(bytes.as_slice()) else { return Ok(()) };
        let Ok(spec) = ModelSpec::try_from(wire) else { return Ok(()) };
        prop_assert!(spec.d_model <= limits::D_MODEL && spec.d_ff <= limits::D_FF);
        prop_assert!(spec.experts_per_layer <= limits::EXPERTS_PER_LAYER && spec.top_k <= spec.experts_per_layer);
        prop_assert!(spec.moe_layers.iter().all(|layer| *layer <= limits::LAYER_INDEX));
        // What placement and the memory check compute from it cannot overflow.
        for expert in [0, spec.experts_per_layer.saturating_sub(1), spec.experts_per_layer] {
            prop_assert!(spec.expert_bytes_of(expert, WeightDtype::F32).checked_mul(u64::from(limits::EXPERTS_PER_LAYER)).is_some());
        }
    }
}

fn safetensors_seed(dir: &Path) -> Vec<u8> {
    let path = dir.join("seed.safetensors");
    let values: Vec<f32> = (0..6).map(|i| i as f32).collect();
    write_f32(&path, &[("w", vec![2, 3], &values), ("b", vec![3], &values[..3])]).expect("seed file");
    std::fs::read(&path).expect("seed bytes")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn safetensors_headers_never_panic_or_read_out_of_range(bytes in hostile(safetensors_seed(&std::env::temp_dir()))) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &bytes).expect("write");
        let files = TensorFiles::open_file(&path);
        let _ = files.names();
        for (tensor, shape) in [("w", vec![2, 3]), ("b", vec![3])] {
            if let Ok(values) = files.read_f32(tensor, &shape) {
                prop_assert_eq!(values.len(), shape.iter().product::<usize>());
            }
        }
    }

    #[test]
    fn config_json_never_panics(bytes in hostile(fixture_config())) {
        let dir = tempfile::tempdir().expect("dir");
        for entry in std::fs::read_dir(fixture_dir()).expect("the fixture") {
            let path = entry.expect("an entry").path();
            if let Some(name) = path.file_name().filter(|name| *name != "config.json") {
                std::os::unix::fs::symlink(&path, dir.path().join(name)).expect("link the fixture's files");
            }
        }
        std::fs::write(dir.path().join("config.json"), &bytes).expect("write");
        if let Ok(checkpoint) = Checkpoint::open(dir.path()) {
            let spec = &checkpoint.spec;
            prop_assert!(spec.d_model <= limits::D_MODEL && spec.experts_per_layer <= limits::EXPERTS_PER_LAYER);
        }
    }
}

fn fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/mixtral-tiny")
}

fn fixture_config() -> Vec<u8> {
    std::fs::read(fixture_dir().join("config.json")).expect("the Mixtral fixture's config.json")
}
