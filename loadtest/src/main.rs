//! `switchyard`: run a local cluster, load-test a cluster, show its status.
//!
//! This binary links no libtorch, so it starts in milliseconds. The commands that compute with
//! libtorch in this process (`bench`, `device-check`, `loadtest --reference`, `local
//! --compare-reference`) are handed, arguments and all, to `switchyard-torch` beside it.

mod cli;
mod libtorch;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    switchyard_common::tracing_setup::init_tracing(cli.log_format);
    cli::run(cli).await
}
