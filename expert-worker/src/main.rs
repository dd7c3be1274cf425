use anyhow::Context;
use clap::Parser;
use switchyard_common::tracing_setup;
use switchyard_expert_worker::Args;
use switchyard_experts::host_memory::HostMemory;

fn main() -> anyhow::Result<()> {
    // SAFETY: first in `main`, before the runtime's threads and libtorch's first tensor.
    #[allow(unsafe_code)]
    let host_memory = unsafe { HostMemory::set_up() };
    tokio::runtime::Runtime::new()?.block_on(run(host_memory))
}

async fn run(host_memory: HostMemory) -> anyhow::Result<()> {
    let args = Args::parse();
    args.check().context("invalid configuration")?;
    args.tls.server_mode().context("invalid configuration")?;
    if args.check_config {
        println!("configuration ok: {args:#?}");
        return Ok(());
    }
    let _spans = tracing_setup::init_tracing(&args.tracing, "switchyard-worker", tracing_setup::SERVER_LOGS)?;
    host_memory.log();
    tch::set_num_threads(args.torch_threads as i32);
    switchyard_common::heap_trim::spawn_heap_trimmer(std::time::Duration::from_millis(args.heap_trim_interval_ms))
        .context("starting the heap trimmer")?;
    let grpc = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let metrics = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    switchyard_expert_worker::run(grpc, metrics, args, switchyard_common::shutdown::signal()).await?;
    Ok(())
}
