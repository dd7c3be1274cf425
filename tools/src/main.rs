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
    // SAFETY: no other thread runs yet, and libtorch has allocated nothing.
    #[allow(unsafe_code)]
    let huge_pages = unsafe { switchyard_experts::huge_pages::advise_huge_page_tensors() };
    tokio::runtime::Runtime::new()?.block_on(run(freed_buffers, huge_pages))
}

async fn run(
    freed_buffers: switchyard_common::freed_buffers::FreedBuffers,
    huge_pages: switchyard_experts::huge_pages::HugePageTensors,
) -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    let _spans = tracing_setup::init_tracing(&cli.tracing, "switchyard", tracing_setup::COMMAND_LOGS)?;
    freed_buffers.log();
    tracing::debug!(outcome = ?huge_pages, "libtorch's large CPU tensors on huge pages");
    cli::run(cli).await
}
