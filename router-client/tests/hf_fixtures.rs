//! The reference layer built from small random Mixtral and Qwen2-MoE checkpoints (public tensor
//! names) against the outputs of Hugging Face transformers' own sparse MoE blocks, recorded by
//! `fixtures/generate_hf_moe.py`. No Python at test time.

use std::path::Path;

use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::safetensors::TensorFiles;
use switchyard_router_client::{ReferenceLayer, RoutingOverrides, relative_frobenius_error};

const TOKENS: usize = 16;

fn check(fixture: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(fixture);
    let checkpoint = Checkpoint::open(&dir).expect("checkpoint opens");
    let spec = checkpoint.spec.clone();
    let reference = ReferenceLayer::from_checkpoint(&checkpoint, &[0, 1], tch::Device::Cpu).expect("experts load");
    let expected = TensorFiles::open_file(&dir.join("expected.safetensors"));
    let read = |name: &str, width: u32| expected.read_f32(name, &[TOKENS, width as usize]).expect("expected tensor");
    let hidden = read("hidden_states", spec.d_model);
    // transformers applies no capacity: a capacity factor of E/k makes room for every assignment.
    let no_capacity = RoutingOverrides {
        capacity_factor: Some(spec.experts_per_layer as f32 / spec.top_k as f32),
        ..Default::default()
    };
    for layer in 0..2u32 {
        let output = reference.forward(layer, &hidden, &no_capacity).expect("forward");
        assert_eq!(output.routing.dropped, 0);
        let out_error = relative_frobenius_error(&output.hidden, &read(&format!("layers.{layer}.out"), spec.d_model));
        let logits = read(&format!("layers.{layer}.router_logits"), spec.experts_per_layer);
        let logits_error = relative_frobenius_error(&output.router_logits, &logits);
        eprintln!("{fixture} layer {layer}: out error {out_error:.1e}, router_logits error {logits_error:.1e}");
        assert!(out_error < 1e-5, "{fixture} layer {layer}: out relative error {out_error:e}");
        assert!(logits_error < 1e-5, "{fixture} layer {layer}: router_logits relative error {logits_error:e}");
    }
}

#[test]
fn mixtral_matches_transformers() {
    check("mixtral-tiny");
}

#[test]
fn qwen2_moe_with_its_gated_shared_expert_matches_transformers() {
    check("qwen2-moe-tiny");
}
