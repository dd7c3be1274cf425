//! `switchyard-torch`: the `switchyard` command line with the commands that compute with libtorch
//! in this process (`bench`, `device-check`, `loadtest --reference`, `local --compare-reference`).
//! `switchyard` hands those to it; every other command runs the same here.

// The one command line, shared with `switchyard` (switchyard-loadtest), which links no libtorch.
#[path = "../../loadtest/src/cli/mod.rs"]
mod cli;
mod libtorch;

use clap::Parser;
use switchyard_common::tracing_setup;
use switchyard_experts::host_memory::HostMemory;

fn main() -> anyhow::Result<()> {
    // SAFETY: first in `main`, before the runtime's threads and libtorch's first tensor.
    #[allow(unsafe_code)]
    let host_memory = unsafe { HostMemory::set_up() };
    tokio::runtime::Runtime::new()?.block_on(run(host_memory))
}

async fn run(host_memory: HostMemory) -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    let _spans = tracing_setup::init_tracing(&cli.tracing, "switchyard", tracing_setup::COMMAND_LOGS)?;
    host_memory.log();
    cli::run(cli).await
}
