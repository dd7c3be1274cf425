//! A checkpoint's `config.json`, beside the Mixtral fixture's weights: a spec within bounds, or a
//! refusal that names the file.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::spec::limits;

fuzz_target!(|bytes: &[u8]| {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| switchyard_fuzz::checkpoint_beside("config", "mixtral-tiny", "config.json"));
    std::fs::write(dir.join("config.json"), bytes).expect("write the config under test");
    match Checkpoint::open(dir) {
        Ok(checkpoint) => {
            let spec = &checkpoint.spec;
            assert!(spec.d_model <= limits::D_MODEL && spec.d_ff <= limits::D_FF, "{spec:?}");
            assert!(spec.experts_per_layer <= limits::EXPERTS_PER_LAYER, "{spec:?}");
        }
        Err(error) => assert!(error.to_string().contains("config.json") || error.to_string().contains("safetensors")),
    }
});
