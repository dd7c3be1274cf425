//! A safetensors file as a worker reads it: header and offsets checked, every read in range or
//! refused with a named reason.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_model::safetensors::TensorFiles;

fuzz_target!(|bytes: &[u8]| {
    let path = switchyard_fuzz::scratch().join("model.safetensors");
    std::fs::write(&path, bytes).expect("write the file under test");
    let files = TensorFiles::open_file(&path);
    let _ = files.names();
    for (tensor, shape) in [("w", vec![2, 3]), ("b", vec![3])] {
        if let Ok(values) = files.read_f32(tensor, &shape) {
            assert_eq!(values.len(), shape.iter().product::<usize>());
        }
        if let Ok(slab) = files.read_slab(tensor, &shape, 0) {
            assert_eq!(slab.shape, shape[1..]);
            assert_eq!(slab.bytes.len(), slab.shape.iter().product::<usize>() * slab.dtype.element_size());
        }
    }
});
