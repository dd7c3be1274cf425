//! `switchyard device-check`: does this machine's device compute what the CPU computes? Each check
//! runs the in-process reference layer (the workers' own compute path: staging, steps, experts)
//! on the device and compares it, by relative Frobenius error, with a ground truth: the same layer
//! in f32 on the CPU for a synthetic model, and transformers' recorded outputs for each checkpoint
//! fixture. f32 must agree to f32 rounding, bf16 and f16 to their precision, rows sent narrower
//! on the wire to theirs. The device's matmul peak in bf16 and f32 is measured alongside, so a
//! report says how fast the device is, too.

use std::path::{Path, PathBuf};

use switchyard_experts::device::device_name;
use switchyard_model::checkpoint::Checkpoint;
use switchyard_model::safetensors::TensorFiles;
use switchyard_model::{CapacityPolicy, ModelSpec, WeightDtype};
use switchyard_proto::wire::WireDtype;
use switchyard_reference::{ReferenceConfig, ReferenceError, ReferenceLayer, relative_frobenius_error};
use switchyard_router_client::capacity::OverflowPolicy;
use switchyard_router_client::routing::RoutingPolicy;
use switchyard_router_client::{ClientError, DispatchLayout, RoutingOverrides};
use tch::Device;

use crate::bench::peak::{self, DevicePeak};

/// One comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: String,
    pub error: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }

    /// `output` against `truth`; a call that failed is a failed check that says why, so that one
    /// configuration the device cannot compute does not hide the others' results.
    fn of(name: String, output: Result<Vec<f32>, ClientError>, truth: &[f32], tolerance: f64) -> Self {
        match output {
            Ok(output) => Self { name, error: relative_frobenius_error(&output, truth), tolerance },
            Err(error) => Self { name: format!("{name}: {error}"), error: f64::INFINITY, tolerance },
        }
    }
}

/// What a device check found.
#[derive(Debug, Clone)]
pub struct DeviceReport {
    pub device: String,
    pub checks: Vec<Check>,
    pub peaks: Vec<DevicePeak>,
}

impl DeviceReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(Check::passed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceCheckError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("fixture {dir}: {reason}")]
    Fixture { dir: PathBuf, reason: String },
}

/// The tolerance of each compute dtype against an f32 ground truth: f32 rounding, or the relative
/// precision of the narrower format (8 bits of mantissa for bf16, 11 for f16) over a layer.
pub fn tolerance(dtype: WeightDtype) -> f64 {
    match dtype {
        WeightDtype::F32 => 1e-5,
        WeightDtype::F16 => 5e-3,
        WeightDtype::Bf16 => 2e-2,
    }
}

/// The tolerance of rows sent in `wire` against f32 rows: as [`tolerance`] for the 16-bit types;
/// e4m3 keeps 3 mantissa bits (a scale per 128 values), a few percent per value, which a layer
/// keeps (3.3e-2 on the synthetic one).
pub fn wire_tolerance(wire: WireDtype) -> f64 {
    match wire {
        WireDtype::F32 => tolerance(WeightDtype::F32),
        WireDtype::F16 => tolerance(WeightDtype::F16),
        WireDtype::Bf16 => tolerance(WeightDtype::Bf16),
        WireDtype::Fp8E4m3 => 5e-2,
    }
}

/// Runs every check on `device`, with the checkpoint fixtures under `fixtures` (each a checkpoint
/// directory with transformers' `expected.safetensors`) when given.
pub async fn run(device: Device, fixtures: Option<&Path>) -> Result<DeviceReport, DeviceCheckError> {
    let synthetic = Synthetic::new().await?;
    let mut checks = synthetic_checks(device, &synthetic).await?;
    checks.extend(wire_and_routing_checks(device, &synthetic).await?);
    if let Some(fixtures) = fixtures {
        for dir in fixture_dirs(fixtures)? {
            checks.extend(fixture_checks(device, &dir).await?);
        }
    }
    let mut peaks = peak::measure(device, WeightDtype::Bf16, &[1]).await;
    peaks.extend(peak::measure(device, WeightDtype::F32, &[1]).await);
    Ok(DeviceReport { device: device_name(device), checks, peaks })
}

/// The synthetic checks' layer (Mixtral-like: 8 experts, top-2, dropless, small), their 64 tokens,
/// and the ground truth most of them compare with: the layer in f32 on the CPU.
struct Synthetic {
    model: ModelSpec,
    hidden: Vec<f32>,
    truth: Vec<f32>,
}

impl Synthetic {
    async fn new() -> Result<Self, DeviceCheckError> {
        let model = ModelSpec {
            name: "device-check".to_owned(),
            d_model: 256,
            d_ff: 512,
            capacity: CapacityPolicy::Dropless,
            ..ModelSpec::default_synthetic()
        };
        let hidden: Vec<f32> = (0..64 * 256).map(|i| ((i as f32) * 0.618).sin() * 1.5).collect();
        let on_cpu = ReferenceConfig::cpu().with_dtype(WeightDtype::F32);
        let truth = forward(&model, on_cpu, &hidden, &RoutingOverrides::default()).await?.0?;
        Ok(Self { model, hidden, truth })
    }
}

/// The synthetic layer in every dtype on `device`, and in bf16 with its experts in grouped
/// products, against itself in f32 on the CPU; and with identity experts (the DeepEP presets'
/// stand-ins), whose output is its input.
async fn synthetic_checks(device: Device, synthetic: &Synthetic) -> Result<Vec<Check>, DeviceCheckError> {
    let Synthetic { model, hidden, truth } = synthetic;
    let overrides = RoutingOverrides::default();
    let mut checks = Vec::new();
    // Grouped products in bf16 only: on CUDA the other dtypes' experts compute one by one anyway.
    let grouped = [(WeightDtype::Bf16, true)];
    for (dtype, grouped_experts) in WeightDtype::ALL.into_iter().map(|dtype| (dtype, false)).chain(grouped) {
        let config = ReferenceConfig { device, grouped_experts, ..ReferenceConfig::cpu() }.with_dtype(dtype);
        let (output, grouped) = forward(model, config, hidden, &overrides).await?;
        let grouped = grouped_label(grouped_experts, grouped);
        let name = format!("synthetic 8 experts top-2, {dtype}{grouped} on {} vs f32 on cpu", device_name(device));
        checks.push(Check::of(name, output, truth, tolerance(dtype)));
    }
    // Identity experts: each token's sum is its gate weights times its row (on a device made
    // there, on a CPU from the request's bytes), and renormalised top-2 weights add up to 1.
    let identity = ReferenceConfig { device, identity_experts: true, ..ReferenceConfig::cpu() };
    let (output, _) = forward(model, identity, hidden, &overrides).await?;
    let name = format!("synthetic 8 identity experts top-2 on {} vs the input", device_name(device));
    checks.push(Check::of(name, output, hidden, tolerance(WeightDtype::F32)));
    Ok(checks)
}

/// The synthetic layer in f32 on `device` with its rows reaching the worker otherwise than as f32
/// token-major rows, against the same call in f32 on the CPU: sent in each narrower wire dtype
/// (converted on the device, FP8's block scales too) and expert-major (answered row by row, not
/// summed on the device); and routed by the policies whose rows differ most: every expert for
/// every token, the experts' own picks, Soft MoE's slot inputs (expert-major), and top-2 at half
/// the capacity it needs (the rows past it dropped).
async fn wire_and_routing_checks(device: Device, synthetic: &Synthetic) -> Result<Vec<Check>, DeviceCheckError> {
    let Synthetic { model, hidden, truth } = synthetic;
    let on_device = ReferenceConfig { device, ..ReferenceConfig::cpu() }.with_dtype(WeightDtype::F32);
    let on_cpu = ReferenceConfig::cpu().with_dtype(WeightDtype::F32);
    let device = device_name(device);
    let plain = RoutingOverrides::default();
    let mut checks = Vec::new();
    for wire_dtype in [WireDtype::F16, WireDtype::Bf16, WireDtype::Fp8E4m3] {
        let (output, _) = forward(model, ReferenceConfig { wire_dtype, ..on_device }, hidden, &plain).await?;
        let name = format!("synthetic 8 experts top-2, f32, {wire_dtype} rows on {device} vs f32 on cpu");
        checks.push(Check::of(name, output, truth, wire_tolerance(wire_dtype)));
    }
    let expert_major = ReferenceConfig { dispatch: DispatchLayout::ExpertMajor, ..on_device };
    let (output, _) = forward(model, expert_major, hidden, &plain).await?;
    let name = format!("synthetic 8 experts top-2, f32, expert-major on {device} vs f32 on cpu");
    checks.push(Check::of(name, output, truth, tolerance(WeightDtype::F32)));
    let routings = [
        (RoutingPolicy::Dense, CapacityPolicy::Dropless),
        (RoutingPolicy::ExpertChoice, CapacityPolicy::Factor(1.0)),
        (RoutingPolicy::SoftMoe { slots: 2 }, CapacityPolicy::Dropless),
        (RoutingPolicy::TopK { k: 2, renormalize: true }, CapacityPolicy::Factor(0.5)),
    ];
    for (policy, capacity) in routings {
        let overrides = RoutingOverrides {
            policy: Some(policy),
            overflow: Some(OverflowPolicy::Drop),
            capacity: Some(capacity),
            ..RoutingOverrides::default()
        };
        let routed_truth = forward(model, on_cpu, hidden, &overrides).await?.0?;
        let (output, _) = forward(model, on_device, hidden, &overrides).await?;
        let capacity = match capacity {
            CapacityPolicy::Factor(factor) => format!(" at capacity factor {factor}"),
            _ => String::new(),
        };
        let name = format!("synthetic 8 experts, {}{capacity}, f32 on {device} vs the same on cpu", policy.name());
        checks.push(Check::of(name, output, &routed_truth, tolerance(WeightDtype::F32)));
    }
    Ok(checks)
}

/// Checkpoint `dir` on `device`, in f32 and in its own dtype, each with its experts one by one and
/// in grouped products, against transformers' outputs.
async fn fixture_checks(device: Device, dir: &Path) -> Result<Vec<Check>, DeviceCheckError> {
    let fixture_error = |reason: String| DeviceCheckError::Fixture { dir: dir.to_path_buf(), reason };
    let checkpoint = Checkpoint::open(dir).map_err(|error| fixture_error(error.to_string()))?;
    let spec = checkpoint.spec;
    let expected = TensorFiles::open_file(&dir.join("expected.safetensors"));
    let read = |name: &str| -> Result<Vec<f32>, DeviceCheckError> {
        let shape = expected.shape(name).map_err(|error| fixture_error(error.to_string()))?;
        expected.read_f32(name, &shape).map_err(|error| fixture_error(error.to_string()))
    };
    let hidden = read("hidden_states")?;
    let stored = spec.resident_dtype(None, device.is_cuda());
    let mut dtypes = vec![WeightDtype::F32];
    if stored != WeightDtype::F32 {
        dtypes.push(stored);
    }
    let mut checks = Vec::new();
    for (dtype, grouped_experts) in dtypes.into_iter().flat_map(|dtype| [(dtype, false), (dtype, true)]) {
        let config = ReferenceConfig { device, grouped_experts, ..ReferenceConfig::cpu() }.with_dtype(dtype);
        let reference = ReferenceLayer::start(&spec, &spec.moe_layers, config).await?;
        for &layer in &spec.moe_layers {
            let expected = read(&format!("layers.{layer}.out"))?;
            let before = reference.grouped_batches();
            let output = reference.forward(layer, &hidden, &RoutingOverrides::default()).await;
            let grouped = grouped_label(grouped_experts, reference.grouped_batches() - before);
            let name =
                format!("{} layer {layer}, {dtype}{grouped} on {} vs transformers", spec.name, device_name(device));
            checks.push(Check::of(name, output.map(|output| output.hidden), &expected, tolerance(dtype)));
        }
        reference.shutdown().await;
    }
    Ok(checks)
}

/// How a check's name says its experts computed in grouped products, and how many batches did:
/// where the device cannot run them without waiting, experts compute one by one (0).
fn grouped_label(grouped_experts: bool, batches: u64) -> String {
    match grouped_experts {
        false => String::new(),
        true => format!(", grouped experts ({batches} batches grouped)"),
    }
}

/// Layer 0 of `model` once through a reference layer built with `config`, routed as the model
/// says with `overrides` applied: the call's output (its failure too) and how many expert batches
/// it computed in grouped products.
async fn forward(
    model: &ModelSpec,
    config: ReferenceConfig,
    hidden: &[f32],
    overrides: &RoutingOverrides,
) -> Result<(Result<Vec<f32>, ClientError>, u64), DeviceCheckError> {
    let reference = ReferenceLayer::start(model, &[0], config).await?;
    let output = reference.forward(0, hidden, overrides).await;
    let grouped = reference.grouped_batches();
    reference.shutdown().await;
    Ok((output.map(|output| output.hidden), grouped))
}

/// The checkpoint directories under `fixtures` that carry transformers' outputs, by name.
fn fixture_dirs(fixtures: &Path) -> Result<Vec<PathBuf>, DeviceCheckError> {
    let entries = std::fs::read_dir(fixtures)
        .map_err(|error| DeviceCheckError::Fixture { dir: fixtures.to_path_buf(), reason: error.to_string() })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|dir| dir.join("config.json").exists() && dir.join("expected.safetensors").exists())
        .collect();
    dirs.sort();
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_that_failed_is_a_failed_check_that_says_why() {
        let truth = [1.0f32, -2.0, 3.0];
        let close = Check::of("close".into(), Ok(vec![1.0, -2.0, 3.0 + 1e-6]), &truth, 1e-5);
        assert!(close.passed() && close.error > 0.0, "{close:?}");
        let far = Check::of("far".into(), Ok(vec![1.0, -2.0, 3.1]), &truth, 1e-5);
        assert!(!far.passed(), "{far:?}");
        let refused = ClientError::InvalidInput { field: "rows", reason: "a CUTLASS kernel refused".into() };
        let failed = Check::of("grouped".into(), Err(refused), &truth, 2e-2);
        assert!(!failed.passed());
        assert_eq!(failed.name, "grouped: rows: a CUTLASS kernel refused");
    }
}
