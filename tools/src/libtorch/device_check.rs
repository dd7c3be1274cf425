//! `switchyard device-check`.

use std::path::PathBuf;

use switchyard_experts::{DeviceChoice, ResolveDevice};
use switchyard_tools::device_check;

#[derive(Debug, clap::Args)]
pub struct DeviceCheckArgs {
    /// The device to check: auto (CUDA if available, else CPU), cpu, cuda or cuda:N.
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,

    /// A folder of checkpoint fixtures (as the repository's fixtures/: config.json, safetensors
    /// shards, transformers' expected.safetensors) to compare on the device too.
    #[arg(long, env = "SWITCHYARD_DEVICE_CHECK_FIXTURES")]
    pub fixtures: Option<PathBuf>,
}

pub async fn run(args: DeviceCheckArgs) -> anyhow::Result<()> {
    let report = device_check::run(args.device.resolve(), args.fixtures.as_deref()).await?;
    println!("device {}", report.device);
    for check in &report.checks {
        let verdict = if check.passed() { "ok  " } else { "FAIL" };
        println!("{verdict} {:.1e} (tolerance {:.0e})  {}", check.error, check.tolerance, check.name);
    }
    for peak in &report.peaks {
        println!("matmul peak {} {} {}³: {:.1} GFLOP/s", peak.device, peak.dtype, peak.size, peak.gflops);
    }
    let failed = report.checks.iter().filter(|check| !check.passed()).count();
    anyhow::ensure!(failed == 0, "{failed} of {} checks failed on {}", report.checks.len(), report.device);
    println!("all {} checks passed on {}", report.checks.len(), report.device);
    Ok(())
}
