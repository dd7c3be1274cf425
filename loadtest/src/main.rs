//! `switchyard`: run a local cluster, load-test a cluster, show its status.
//!
//! This binary links no libtorch, so it starts in milliseconds. The commands that compute with
//! libtorch in this process (`bench`, `device-check`, `loadtest --reference`, `local
//! --compare-reference`) are handed, arguments and all, to `switchyard-torch` beside it.

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
    // `switchyard help bench`: the help of a command switchyard-torch parses is its to give.
    let mut words = std::env::args().skip(1);
    if words.next().as_deref() == Some("help") && words.next().is_some_and(|word| libtorch::parses(&word)) {
        return Err(libtorch::run_in_switchyard_torch());
    }
    let cli = cli::Cli::parse();
    let _spans = tracing_setup::init_tracing(&cli.tracing, "switchyard", tracing_setup::COMMAND_LOGS)?;
    freed_buffers.log();
    cli::run(cli).await
}
