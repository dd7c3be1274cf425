//! `switchyard-torch`: the `switchyard` command line with the commands that compute with libtorch
//! in this process (`bench`, `device-check`, `loadtest --reference`, `local --compare-reference`).
//! `switchyard` hands those to it; every other command runs the same here.

// The one command line, shared with `switchyard` (switchyard-loadtest), which links no libtorch.
#[path = "../../loadtest/src/cli/mod.rs"]
mod cli;
mod libtorch;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads: glibc settles its arenas at a second thread's first allocation.
    let freed_buffers = switchyard_common::freed_buffers::keep_freed_buffers();
    tokio::runtime::Runtime::new()?.block_on(run(freed_buffers))
}

async fn run(freed_buffers: switchyard_common::freed_buffers::FreedBuffers) -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    let _spans = switchyard_common::tracing_setup::init_tracing(&cli.tracing, "switchyard")?;
    freed_buffers.log();
    cli::run(cli).await
}
