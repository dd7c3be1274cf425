//! `switchyard-torch`: the `switchyard` command line with the commands that compute with libtorch
//! in this process (`bench`, `device-check`, `loadtest --reference`, `local --compare-reference`).
//! `switchyard` hands those to it; every other command runs the same here.

// The one command line, shared with `switchyard` (switchyard-loadtest), which links no libtorch.
#[path = "../../loadtest/src/cli/mod.rs"]
mod cli;
mod libtorch;

use clap::Parser;
use switchyard_common::tracing_setup;

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads: glibc settles its arenas at a second thread's first allocation.
    let freed_buffers = switchyard_common::freed_buffers::keep_freed_buffers();
    tokio::runtime::Runtime::new()?.block_on(run(freed_buffers))
}

async fn run(freed_buffers: switchyard_common::freed_buffers::FreedBuffers) -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    let _spans = tracing_setup::init_tracing(&cli.tracing, "switchyard", tracing_setup::COMMAND_LOGS)?;
    freed_buffers.log();
    cli::run(cli).await
}
