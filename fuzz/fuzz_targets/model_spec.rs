//! A `ModelSpec` from the wire (`LoadExperts`, the coordinator's flags): bounded or refused, and
//! nothing placement or the memory check computes from an accepted one overflows.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchyard_model::spec::limits;
use switchyard_model::{ModelSpec, WeightDtype};

fuzz_target!(|bytes: &[u8]| {
    let Ok(wire) = switchyard_proto::v1::ModelSpec::decode(bytes) else { return };
    let Ok(spec) = ModelSpec::try_from(wire) else { return };
    assert!(spec.d_model <= limits::D_MODEL && spec.d_ff <= limits::D_FF, "{spec:?}");
    assert!(spec.experts_per_layer <= limits::EXPERTS_PER_LAYER && spec.top_k <= spec.experts_per_layer, "{spec:?}");
    assert!(spec.moe_layers.iter().all(|layer| *layer <= limits::LAYER_INDEX), "{spec:?}");
    for expert in [0, spec.experts_per_layer.saturating_sub(1), spec.experts_per_layer] {
        for dtype in WeightDtype::ALL {
            let bytes = spec.expert_bytes_of(expert, dtype);
            assert!(bytes.checked_mul(u64::from(limits::EXPERTS_PER_LAYER)).is_some(), "{spec:?}");
        }
    }
});
