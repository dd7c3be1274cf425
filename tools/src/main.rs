//! `switchyard`: run a local cluster, load-test a cluster, show its status.

mod cli;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    switchyard_common::tracing_setup::init_tracing(cli.log_format);
    cli::run(cli).await
}
