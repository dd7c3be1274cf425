//! The in-process reference layer built from small random checkpoints of every served family
//! (saved by transformers itself, public tensor names, sharded) against the outputs of each
//! family's own MoE block, recorded by `fixtures/generate_hf_moe.py`. No Python at test time.
//!
//! Every fixture's inputs are skewed so that a capacity factor of 1.25 would drop tokens: with the
//! default flags (the checkpoint's own capacity policy) the dropless families drop nothing and
//! Switch Transformers drops exactly what transformers drops.

use std::path::{Path, PathBuf};

use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::safetensors::TensorFiles;
use switchyard_model::{CapacityPolicy, Family, ModelSpec, WeightDtype, expert_capacity};
use switchyard_reference::{ReferenceConfig, ReferenceLayer, ReferenceOutput, relative_frobenius_error};
use switchyard_router_client::RoutingOverrides;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
}

/// Every checkpoint in `fixtures/`, by directory name; checked to cover every served family.
fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixture(""))
        .expect("fixtures/")
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().join("config.json").exists())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// One fixture: its checkpoint, the reference layer of all its MoE layers, and transformers' outputs.
struct Fixture {
    name: String,
    spec: ModelSpec,
    reference: ReferenceLayer,
    expected: Expected,
}

impl Fixture {
    /// Computing in f32: transformers' outputs were computed in f32 from the stored values, which
    /// bf16 and MXFP4 checkpoints hold exactly in f32, so every family agrees to f32 rounding.
    async fn load(name: &str) -> Self {
        Self::load_in(name, Some(WeightDtype::F32)).await
    }

    /// Computing in `dtype` (`None`: the checkpoint's own).
    async fn load_in(name: &str, dtype: Option<WeightDtype>) -> Self {
        Self::load_with(name, ReferenceConfig { dtype, ..ReferenceConfig::cpu() }).await
    }

    async fn load_with(name: &str, config: ReferenceConfig) -> Self {
        let dir = fixture(name);
        let checkpoint = Checkpoint::open(&dir).unwrap_or_else(|error| panic!("{name}: {error}"));
        let spec = checkpoint.spec.clone();
        let reference = ReferenceLayer::start(&spec, &spec.moe_layers, config)
            .await
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        let expected = Expected::open(&dir, &spec);
        Self { name: name.to_owned(), spec, reference, expected }
    }

    async fn forward(&self, layer: u32, hidden: &[f32], overrides: &RoutingOverrides) -> ReferenceOutput {
        self.reference.forward(layer, hidden, overrides).await.unwrap_or_else(|error| panic!("{}: {error}", self.name))
    }
}

/// What transformers computed for one fixture.
struct Expected {
    files: TensorFiles,
    tokens: usize,
    d_model: usize,
    experts: usize,
}

impl Expected {
    fn open(dir: &Path, spec: &ModelSpec) -> Self {
        let files = TensorFiles::open_file(&dir.join("expected.safetensors"));
        let shape = files.shape("hidden_states").expect("hidden_states");
        Self { files, tokens: shape[0], d_model: spec.d_model as usize, experts: spec.experts_per_layer as usize }
    }

    fn read(&self, name: &str, width: usize) -> Vec<f32> {
        self.files.read_f32(name, &[self.tokens, width]).unwrap_or_else(|error| panic!("{name}: {error}"))
    }

    fn hidden(&self) -> Vec<f32> {
        self.read("hidden_states", self.d_model)
    }

    fn out(&self, layer: u32) -> Vec<f32> {
        self.read(&format!("layers.{layer}.out"), self.d_model)
    }

    fn router_logits(&self, layer: u32) -> Vec<f32> {
        self.read(&format!("layers.{layer}.router_logits"), self.experts)
    }

    /// Tokens each expert received in transformers' block.
    fn tokens_per_expert(&self, layer: u32) -> Vec<u32> {
        let dispatched = self.read(&format!("layers.{layer}.dispatched"), self.experts);
        (0..self.experts).map(|e| dispatched.iter().skip(e).step_by(self.experts).sum::<f32>() as u32).collect()
    }
}

#[tokio::test]
async fn every_family_matches_transformers_with_its_default_capacity_policy() {
    let mut families = Vec::new();
    for name in fixture_names() {
        let fixture = Fixture::load(&name).await;
        let (spec, expected) = (&fixture.spec, &fixture.expected);
        families.push(spec.family);
        assert_eq!(spec.layer_count(), 2, "{name}: two MoE layers");
        let hidden = expected.hidden();
        for &layer in &spec.moe_layers {
            let output = fixture.forward(layer, &hidden, &RoutingOverrides::default()).await;
            let out_error = relative_frobenius_error(&output.hidden, &expected.out(layer));
            let logits_error = relative_frobenius_error(&output.router_logits, &expected.router_logits(layer));
            eprintln!("{name} layer {layer}: out error {out_error:.1e}, router_logits error {logits_error:.1e}");
            assert!(out_error < 1e-5, "{name} layer {layer}: out relative error {out_error:e}");
            assert!(logits_error < 1e-5, "{name} layer {layer}: router_logits relative error {logits_error:e}");
            assert_eq!(output.routing.tokens_per_expert, expected.tokens_per_expert(layer), "{name} layer {layer}");
            let busiest = *output.routing.tokens_per_expert.iter().max().expect("experts") as usize;
            let at_1_25 = expert_capacity(expected.tokens, spec.top_k as usize, expected.experts, 1.25);
            match spec.capacity {
                CapacityPolicy::Dropless => {
                    assert_eq!(output.routing.dropped, 0, "{name} layer {layer}");
                    assert!(busiest > at_1_25, "{name} layer {layer}: busiest {busiest} must pass 1.25x ({at_1_25})");
                }
                CapacityPolicy::PerSequence(capacity) => {
                    assert_eq!(spec.family, Family::SwitchTransformers);
                    assert!(output.routing.dropped > 0, "{name} layer {layer}: the skewed inputs overflow");
                    assert_eq!(busiest, capacity as usize, "{name} layer {layer}");
                }
                CapacityPolicy::Factor(_) => panic!("{name}: a checkpoint's default is never a factor"),
            }
        }
    }
    families.sort_by_key(|family| family.model_type());
    families.dedup();
    assert_eq!(families.len(), Family::CHECKPOINT_FAMILIES.len(), "a fixture for every served family: {families:?}");
}

/// Each step's rows and answers moved as on a GPU (one upload with the token-major indices and
/// weights, one download: `copied_transfers_on_cpu`), every family's layers come out bit for bit
/// as moved in place, router logits and routing included, in f32 and in the checkpoint's own dtype.
#[tokio::test]
async fn every_family_computes_alike_when_its_rows_are_moved_as_on_a_gpu() {
    for name in fixture_names() {
        for dtype in [Some(WeightDtype::F32), None] {
            let in_place = Fixture::load_in(&name, dtype).await;
            let config = ReferenceConfig { dtype, copied_transfers_on_cpu: true, ..ReferenceConfig::cpu() };
            let copied = Fixture::load_with(&name, config).await;
            let hidden = in_place.expected.hidden();
            for &layer in &in_place.spec.moe_layers {
                let want = in_place.forward(layer, &hidden, &RoutingOverrides::default()).await;
                let have = copied.forward(layer, &hidden, &RoutingOverrides::default()).await;
                let case = format!("{name} layer {layer} in {dtype:?}");
                assert!(want.hidden.iter().any(|value| *value != 0.0), "{case}: an output to compare");
                assert_eq!(bits(&have.hidden), bits(&want.hidden), "{case}: out");
                assert_eq!(bits(&have.router_logits), bits(&want.router_logits), "{case}: router logits");
                assert_eq!(have.routing.tokens_per_expert, want.routing.tokens_per_expert, "{case}");
            }
            // Copied, each token-major part's indices and gate weights travel in the upload too:
            // the copying layer really took the GPU's path.
            let (in_place, copied) = (in_place.reference.staged_bytes(), copied.reference.staged_bytes());
            assert!(in_place > 0 && copied > in_place, "{name} in {dtype:?}: staged {copied} against {in_place}");
        }
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|value| value.to_bits()).collect()
}

/// With no dtype given, a checkpoint computes in the dtype it stores: the bf16 ones (Mixtral and
/// GPT-OSS as they ship, MXFP4 dequantized to bf16) agree with transformers' f32 outputs to bf16's
/// precision, and no closer (they really computed in bf16); the f32 ones as closely as before.
#[tokio::test]
async fn every_checkpoint_computes_in_its_own_dtype_by_default() {
    let mut bf16_checkpoints = Vec::new();
    for name in fixture_names() {
        let checkpoint = Checkpoint::open(&fixture(&name)).expect("opens");
        let first_layer = checkpoint.spec.moe_layers[0];
        let stored = checkpoint.expert_weights(first_layer, 0).expect("expert 0").w1.dtype;
        let fixture = Fixture::load_in(&name, None).await;
        let hidden = fixture.expected.hidden();
        for &layer in &fixture.spec.moe_layers {
            let output = fixture.forward(layer, &hidden, &RoutingOverrides::default()).await;
            let error = relative_frobenius_error(&output.hidden, &fixture.expected.out(layer));
            eprintln!("{name} layer {layer} in {stored}: out error {error:.1e}");
            match stored {
                WeightDtype::Bf16 => {
                    assert!(error > 1e-5 && error < 2e-2, "{name} layer {layer}: bf16 error {error:e}")
                }
                _ => assert!(error < 1e-5, "{name} layer {layer}: {stored} error {error:e}"),
            }
        }
        if stored == WeightDtype::Bf16 {
            bf16_checkpoints.push(name);
        }
    }
    assert_eq!(bf16_checkpoints, ["gpt-oss-mxfp4-tiny", "gpt-oss-tiny", "mixtral-bf16-tiny"]);
}

#[tokio::test]
async fn the_families_are_read_as_their_configs_say() {
    let spec = |name: &str| Checkpoint::open(&fixture(name)).expect("opens").spec;
    let names = fixture_names();
    let deepseek = spec("deepseek-v3-tiny");
    assert_eq!((deepseek.family, deepseek.moe_layers.clone()), (Family::DeepseekV3, vec![1, 2]));
    assert_eq!((deepseek.router.groups, deepseek.router.top_groups, deepseek.router.scaling), (4, 2, 2.5));
    assert_eq!((deepseek.shared_experts, deepseek.shared_d_ff), (1, 24));
    let v2 = spec("deepseek-v2-lite-tiny");
    assert_eq!(
        (v2.shared_experts, v2.shared_d_ff, v2.router.renormalize),
        (1, 48, false),
        "2 shared experts as one MLP"
    );
    let gpt_oss = spec("gpt-oss-tiny");
    assert!(gpt_oss.expert_bias && gpt_oss.router.logit_bias);
    assert!(Checkpoint::open(&fixture("gpt-oss-mxfp4-tiny")).expect("opens").mxfp4_experts);
    assert_eq!(gpt_oss.activation, switchyard_model::Activation::ClampedSwiGlu { alpha: 1.702, limit: 1.0 });
    let switch = spec("switch-transformers-tiny");
    assert_eq!((switch.moe_layers.clone(), switch.top_k), (vec![1, 3], 1));
    for name in &names {
        let model = spec(name);
        let expected = if model.family == Family::SwitchTransformers {
            CapacityPolicy::PerSequence(10)
        } else {
            CapacityPolicy::Dropless
        };
        assert_eq!(model.capacity, expected, "{name}");
    }
}

/// Why dropless matters: the same Mixtral forward with a 1.25 capacity factor drops assignments
/// and no longer equals transformers.
#[tokio::test]
async fn a_capacity_factor_on_a_dropless_checkpoint_changes_the_model() {
    let mixtral = Fixture::load("mixtral-tiny").await;
    let capped = RoutingOverrides { capacity: Some(CapacityPolicy::Factor(1.25)), ..Default::default() };
    let output = mixtral.forward(0, &mixtral.expected.hidden(), &capped).await;
    let error = relative_frobenius_error(&output.hidden, &mixtral.expected.out(0));
    assert!(output.routing.dropped > 0 && error > 1e-3, "dropped {}, error {error:e}", output.routing.dropped);
}

/// Switch Transformers drops the tokens past `expert_capacity` in token order within the
/// sequence: a dropped token's block output is zero, exactly where transformers' is.
#[tokio::test]
async fn switch_transformers_drops_exactly_the_tokens_transformers_drops() {
    let switch = Fixture::load("switch-transformers-tiny").await;
    let expected = &switch.expected;
    for &layer in &switch.spec.moe_layers {
        let output = switch.forward(layer, &expected.hidden(), &RoutingOverrides::default()).await;
        let dispatched = expected.read(&format!("layers.{layer}.dispatched"), expected.experts);
        let dropped_by_transformers: Vec<usize> = (0..expected.tokens)
            .filter(|t| dispatched[t * expected.experts..][..expected.experts].iter().all(|d| *d == 0.0))
            .collect();
        let zero_rows: Vec<usize> = (0..expected.tokens)
            .filter(|t| output.hidden[t * expected.d_model..][..expected.d_model].iter().all(|v| *v == 0.0))
            .collect();
        assert!(!dropped_by_transformers.is_empty(), "layer {layer}: the fixture overflows");
        assert_eq!(zero_rows, dropped_by_transformers, "layer {layer}");
        assert_eq!(output.routing.dropped, dropped_by_transformers.len(), "layer {layer}");
    }
}

/// A batch of sequences: Switch Transformers' capacity counts tokens within each sequence, so the
/// same 32 tokens as two sequences of 16 drop other tokens than as one sequence; both equal
/// transformers when the call says where the sequences are.
#[tokio::test]
async fn switch_transformers_capacity_applies_to_each_sequence_of_a_batch() {
    let switch = Fixture::load("switch-transformers-tiny").await;
    let expected = &switch.expected;
    let sequence = expected.tokens / 2;
    let batched = expected.files.read_f32("batched.hidden_states", &[2, sequence, expected.d_model]).expect("batch");
    assert_eq!(batched, expected.hidden(), "the same tokens, in the same order");
    let two_sequences = RoutingOverrides { sequence_tokens: Some(sequence), ..Default::default() };
    for &layer in &switch.spec.moe_layers {
        let read = |name: &str, width: usize| {
            expected.files.read_f32(&format!("layers.{layer}.batched.{name}"), &[2, sequence, width]).expect(name)
        };
        let output = switch.forward(layer, &batched, &two_sequences).await;
        let error = relative_frobenius_error(&output.hidden, &read("out", expected.d_model));
        assert!(error < 1e-5, "layer {layer}: out relative error {error:e}");
        let dispatched: f32 = read("dispatched", expected.experts).iter().sum();
        assert_eq!(output.routing.dropped, expected.tokens - dispatched as usize, "layer {layer}");
        let one_sequence = switch.forward(layer, &batched, &RoutingOverrides::default()).await;
        assert!(
            one_sequence.routing.dropped > output.routing.dropped,
            "layer {layer}: 10 of 32 drops more than 10 of 16 twice"
        );
    }
    let ragged = RoutingOverrides { sequence_tokens: Some(5), ..Default::default() };
    let error = switch.reference.forward(1, &batched, &ragged).await.unwrap_err().to_string();
    assert_eq!(error, "hidden: 32 tokens are not a whole number of sequences of 5 tokens");
}
