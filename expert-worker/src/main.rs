use anyhow::Context;
use clap::Parser;
use switchyard_common::tracing_setup;
use switchyard_expert_worker::Args;

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
    let args = Args::parse();
    args.check().context("invalid configuration")?;
    args.tls.server_mode().context("invalid configuration")?;
    if args.check_config {
        println!("configuration ok: {args:#?}");
        return Ok(());
    }
    let _spans = tracing_setup::init_tracing(&args.tracing, "switchyard-worker", tracing_setup::SERVER_LOGS)?;
    freed_buffers.log();
    tracing::debug!(outcome = ?huge_pages, "libtorch's large CPU tensors on huge pages");
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
