//! The reference layer's config reaches its client: rows go to the worker in the wire dtype and
//! layout it names (what `switchyard device-check` relies on to compare them on a device).

use switchyard_model::{CapacityPolicy, ModelSpec};
use switchyard_proto::wire::WireDtype;
use switchyard_reference::{ReferenceConfig, ReferenceLayer, ReferenceOutput, relative_frobenius_error};
use switchyard_router_client::{DispatchLayout, RoutingOverrides};

const D_MODEL: usize = 64;
const TOKENS: usize = 16;

async fn forward(config: ReferenceConfig) -> ReferenceOutput {
    let model = ModelSpec {
        d_model: D_MODEL as u32,
        d_ff: 32,
        capacity: CapacityPolicy::Dropless,
        ..ModelSpec::default_synthetic()
    };
    let hidden: Vec<f32> = (0..TOKENS * D_MODEL).map(|i| ((i as f32) * 0.37).sin()).collect();
    let reference = ReferenceLayer::start(&model, &[0], config).await.expect("reference layer");
    let output = reference.forward(0, hidden, &RoutingOverrides::default()).await.expect("forward");
    reference.shutdown().await;
    output
}

#[tokio::test]
async fn rows_travel_in_the_wire_dtype_and_layout_the_config_names() {
    let plain = forward(ReferenceConfig::cpu()).await;
    // Token-major: each token once to the one worker, in f32.
    assert_eq!(plain.bytes.payload_sent, (TOKENS * D_MODEL * 4) as u64);
    let top_k = plain.routing.tokens_per_expert.iter().sum::<u32>() as usize / TOKENS;
    assert_eq!(top_k, 2, "{:?}", plain.routing);

    let bf16 = forward(ReferenceConfig { wire_dtype: WireDtype::Bf16, ..ReferenceConfig::cpu() }).await;
    assert_eq!(bf16.bytes.payload_sent, (TOKENS * D_MODEL * 2) as u64);
    let error = relative_frobenius_error(&bf16.hidden, &plain.hidden);
    assert!(error > 0.0 && error < 2e-2, "bf16 rows round: {error:e}");

    let fp8 = forward(ReferenceConfig { wire_dtype: WireDtype::Fp8E4m3, ..ReferenceConfig::cpu() }).await;
    assert_eq!(fp8.bytes.payload_sent, (TOKENS * WireDtype::Fp8E4m3.row_bytes(D_MODEL)) as u64);

    let expert_major =
        forward(ReferenceConfig { dispatch: DispatchLayout::ExpertMajor, ..ReferenceConfig::cpu() }).await;
    assert_eq!(expert_major.bytes.payload_sent, (TOKENS * top_k * D_MODEL * 4) as u64, "a row per assignment");
    assert_eq!(expert_major.bytes.payload_received, expert_major.bytes.payload_sent, "answered row by row");
    assert_eq!(expert_major.hidden, plain.hidden, "the same sums, added on the client instead");
}
