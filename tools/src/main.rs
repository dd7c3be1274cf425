//! `switchyard-torch`: the `switchyard` command line with the commands that compute with libtorch
//! in this process (`bench`, `device-check`, `loadtest --reference`, `local --compare-reference`).
//! `switchyard` hands those to it; every other command runs the same here.

// The one command line, shared with `switchyard` (switchyard-loadtest), which links no libtorch.
#[path = "../../loadtest/src/cli/mod.rs"]
mod cli;
mod libtorch;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    let _spans = switchyard_common::tracing_setup::init_tracing(&cli.tracing, "switchyard")?;
    cli::run(cli).await
}
