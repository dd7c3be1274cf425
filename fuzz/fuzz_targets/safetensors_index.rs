//! A sharded checkpoint's `model.safetensors.index.json`: shard names stay inside the checkpoint's
//! folder, and every read is of a listed shard or refused.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard_model::safetensors::TensorFiles;

/// The checkpoint folder with its one shard, made once per process.
fn sharded() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = switchyard_fuzz::scratch().join("sharded");
        std::fs::create_dir_all(&dir).expect("a checkpoint folder");
        let values = [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0];
        let shard = dir.join("model-00001-of-00001.safetensors");
        switchyard_model::safetensors::write_f32(&shard, &[("w", vec![2, 3], &values), ("b", vec![3], &values[..3])])
            .expect("the shard");
        dir
    })
}

fuzz_target!(|bytes: &[u8]| {
    let dir = sharded();
    std::fs::write(dir.join("model.safetensors.index.json"), bytes).expect("write the index under test");
    let Ok(files) = TensorFiles::open(dir) else { return };
    let Ok(names) = files.names() else { return };
    for name in names.iter().take(8) {
        let _ = files.read_f32(name, &[2, 3]);
        let _ = files.read_f32(name, &[3]);
    }
});
