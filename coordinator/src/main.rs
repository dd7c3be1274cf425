use anyhow::Context;
use clap::Parser;
use switchyard_coordinator::Args;
use switchyard_coordinator::cluster::ClusterConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    switchyard_common::tracing_setup::init_tracing(args.log_format);
    let config = ClusterConfig::try_from(&args).context("invalid configuration")?;
    if args.check_config {
        println!("configuration ok: listen {} metrics {} {config:#?}", args.listen, args.metrics_listen);
        return Ok(());
    }
    let grpc = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let metrics = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    switchyard_coordinator::run(grpc, metrics, config, switchyard_common::shutdown::signal()).await?;
    Ok(())
}
