use anyhow::Context;
use clap::Parser;
use switchyard_common::tracing_setup;
use switchyard_coordinator::Args;
use switchyard_coordinator::cluster::ClusterConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _spans = tracing_setup::init_tracing(&args.tracing, "switchyard-coordinator", tracing_setup::SERVER_LOGS)?;
    let config = ClusterConfig::try_from(&args).context("invalid configuration")?;
    let tls_files = args.tls.server_mode().context("invalid configuration")?;
    if args.check_config {
        println!("configuration ok: listen {} metrics {} {config:#?}", args.listen, args.metrics_listen);
        return Ok(());
    }
    let grpc = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let metrics = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    let tls = match tls_files {
        Some(files) => {
            switchyard_common::tls::use_for_outgoing(switchyard_common::tls::ClientTls::load(files.clone())?);
            Some(switchyard_common::tls::ServerTls::load(files)?)
        }
        None => None,
    };
    switchyard_coordinator::run(grpc, metrics, config, tls, switchyard_common::shutdown::signal()).await?;
    Ok(())
}
