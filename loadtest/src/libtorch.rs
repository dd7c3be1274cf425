//! The commands that compute with libtorch, as `switchyard` runs them: by replacing itself with
//! `switchyard-torch` (the same command line), which links libtorch. Their flags are parsed there,
//! so `switchyard bench --help` shows that binary's help.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

use switchyard_common::tracing_setup::TracingArgs;

use crate::cli::loadtest::LoadtestArgs;
use crate::cli::local::LocalArgs;

/// Whatever follows the command, for `switchyard-torch` to parse.
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub struct Passthrough {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0.., hide = true)]
    arguments: Vec<OsString>,
}

pub type BenchArgs = Passthrough;
pub type DeviceCheckArgs = Passthrough;

pub async fn bench(_: BenchArgs) -> anyhow::Result<()> {
    Err(run_in_switchyard_torch())
}

pub async fn device_check(_: DeviceCheckArgs) -> anyhow::Result<()> {
    Err(run_in_switchyard_torch())
}

pub async fn loadtest_reference(_: LoadtestArgs, _torch_threads: u32) -> anyhow::Result<()> {
    Err(run_in_switchyard_torch())
}

pub async fn local_compared(_: LocalArgs, _: &TracingArgs) -> anyhow::Result<()> {
    Err(run_in_switchyard_torch())
}

/// Whether `command` is one whose flags only switchyard-torch parses.
pub fn parses(command: &str) -> bool {
    matches!(command, "bench" | "device-check")
}

/// Replaces this process with `switchyard-torch` and the same arguments; returns only on failure.
pub fn run_in_switchyard_torch() -> anyhow::Error {
    let companion = match std::env::current_exe() {
        Ok(me) => me.with_file_name("switchyard-torch"),
        Err(error) => return anyhow::anyhow!("locating the switchyard binary: {error}"),
    };
    let error = std::process::Command::new(&companion).arg0("switchyard").args(std::env::args_os().skip(1)).exec();
    anyhow::anyhow!(
        "this command computes with libtorch, which switchyard-torch runs, but {} could not be started: {error}",
        companion.display()
    )
}
