//! The GPU checks as far as a CPU allows. `switchyard device-check --device cpu` runs the workers'
//! compute path in f32, f16 and bf16 (and bf16 in grouped products) against f32, identity experts
//! against their input, f16, bf16 and FP8 rows on the wire and expert-major rows against f32
//! token-major ones, four routing policies against themselves, and every
//! checkpoint fixture (its experts one by one and in grouped products) against transformers'
//! outputs, as `scripts/gpu-check.sh` runs it on a GPU; and the script itself refuses
//! plainly where there is no GPU.

use std::path::Path;
use std::process::Command;

use switchyard_integration_tests::binaries_dir;

fn repository() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn device_check_passes_on_the_cpu_with_every_fixture() {
    let fixtures = repository().join("fixtures");
    let result = Command::new(binaries_dir().join("switchyard"))
        .args(["device-check", "--device", "cpu", "--fixtures"])
        .arg(&fixtures)
        .env("RUST_LOG", "warn")
        .output()
        .expect("switchyard device-check runs");
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(result.status.success(), "{stdout}{}", String::from_utf8_lossy(&result.stderr));
    let fixture_layers = 2 * std::fs::read_dir(&fixtures)
        .expect("fixtures")
        .filter(|entry| entry.as_ref().is_ok_and(|entry| entry.path().join("expected.safetensors").exists()))
        .count();
    // Three synthetic dtypes, bf16 with grouped experts and identity experts; every fixture layer in f32, the bf16
    // fixtures' layers in bf16 too, each one by one and with grouped experts.
    let bf16_layers = stdout.lines().filter(|line| line.contains("bf16 on cpu vs transformers")).count();
    assert_eq!(bf16_layers, 3 * 2, "{stdout}");
    let grouped: Vec<&str> = stdout.lines().filter(|line| line.contains("grouped experts (")).collect();
    assert_eq!(grouped.len(), 1 + fixture_layers + bf16_layers, "{stdout}");
    for line in grouped {
        let batches: u32 = line
            .split("grouped experts (")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|count| count.parse().ok())
            .expect("how many batches were grouped");
        assert!(batches >= 2, "a CPU computes each layer's experts in grouped products: {line}");
    }
    assert!(stdout.contains("synthetic 8 identity experts top-2 on cpu vs the input"), "{stdout}");
    // A passed check's error, from its line: "ok   3.3e-2 (tolerance 5e-2)  <name>".
    let passed_with_error = |name: &str| -> f64 {
        let line = stdout.lines().find(|line| line.starts_with("ok") && line.ends_with(name));
        let error = line.and_then(|line| line.split_whitespace().nth(1)).and_then(|error| error.parse().ok());
        error.unwrap_or_else(|| panic!("{name}: no passed check with an error: {stdout}"))
    };
    let narrower_rows = ["f16", "bf16", "fp8"].map(|dtype| format!("f32, {dtype} rows on cpu vs f32 on cpu"));
    for name in &narrower_rows {
        // Rounded on the wire, so not the f32 rows' output: the call did send them narrower.
        assert!(passed_with_error(name) > 0.0, "{name}: {stdout}");
    }
    let routed_otherwise =
        ["dense", "expert choice at capacity factor 1", "soft MoE", "top-k (renormalised) at capacity factor 0.5"]
            .map(|routing| format!("synthetic 8 experts, {routing}, f32 on cpu vs the same on cpu"));
    let expert_major = "synthetic 8 experts top-2, f32, expert-major on cpu vs f32 on cpu".to_owned();
    for name in routed_otherwise.iter().chain([&expert_major]) {
        passed_with_error(name);
    }
    let rows_otherwise = narrower_rows.len() + 1;
    let checks = 3 + 1 + 1 + rows_otherwise + routed_otherwise.len() + 2 * (fixture_layers + bf16_layers);
    assert!(stdout.contains(&format!("all {checks} checks passed on cpu")), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("matmul peak cpu bf16") && stdout.contains("matmul peak cpu f32"), "{stdout}");
}

#[test]
fn gpu_check_says_plainly_that_it_needs_a_gpu() {
    let report = tempfile::tempdir().expect("temp dir");
    let result = Command::new("bash")
        .arg(repository().join("scripts/gpu-check.sh"))
        .arg(report.path().join("gpu"))
        .env("SWITCHYARD_NVIDIA_SMI", "/nonexistent/nvidia-smi")
        .output()
        .expect("bash runs the script");
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no NVIDIA GPU here"), "{stderr}");
    assert!(!report.path().join("gpu").exists(), "nothing written without a GPU");
}

/// `SWITCHYARD_GPU_CHECK_STEPS` runs the steps it names and no other: here the grouped-experts
/// bench alone, against stand-ins for `nvidia-smi` and the binaries that record how they were
/// called.
#[test]
fn gpu_check_runs_only_the_steps_it_is_told() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let calls = dir.path().join("calls.log");
    let stand_in = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n# libtorch_cuda.so linked\n{body}\n")).expect("stand-in written");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("executable");
    };
    stand_in("nvidia-smi", "echo 'NVIDIA Stand-in GPU'");
    let record = format!(
        r#"echo "$(basename "$0") $*" >> {calls}
while [ $# -gt 0 ]; do [ "$1" = --out ] && mkdir -p "$2" && echo '| 1 | 8 | 2 |' > "$2/report.md"; shift; done"#,
        calls = calls.display()
    );
    for binary in ["switchyard", "switchyard-torch", "switchyard-coordinator", "switchyard-worker"] {
        stand_in(binary, &record);
    }
    let python = repository().join(".venv/bin/python");
    let result = Command::new("bash")
        .arg(repository().join("scripts/gpu-check.sh"))
        .arg(dir.path().join("report"))
        .arg(dir.path())
        .env("SWITCHYARD_NVIDIA_SMI", dir.path().join("nvidia-smi"))
        .env("SWITCHYARD_PYTHON", if python.exists() { python.as_os_str() } else { "python3".as_ref() })
        .env("SWITCHYARD_GPU_CHECK_STEPS", "mixtral-grouped")
        .output()
        .expect("bash runs the script");
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(result.status.success(), "{stdout}{}", String::from_utf8_lossy(&result.stderr));
    let calls = std::fs::read_to_string(&calls).expect("the bench was called");
    let calls: Vec<&str> = calls.lines().collect();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].starts_with("switchyard bench --run sweep --device cuda --grouped-experts"), "{calls:?}");
    assert!(stdout.contains("Mixtral-size bench, grouped experts done"), "{stdout}");
    assert!(!stdout.contains("device-check ("), "{stdout}");
}
