//! `switchyard loadtest`.

use std::sync::Arc;

use anyhow::Context;
use switchyard_loadtest::loadtest::{self, LoadSpec, Target};
use switchyard_model::ModelSpec;
use switchyard_model::cli::ModelArgs;
use switchyard_model::device::DeviceChoice;
use switchyard_router_client::{MoeClient, TableWatcher};

use super::load_args::LoadArgs;
use super::values::DtypeArg;

#[derive(Debug, clap::Args)]
pub struct LoadtestArgs {
    /// Coordinator of the cluster to drive, e.g. http://127.0.0.1:50051 (or 127.0.0.1:50051).
    #[arg(long, env = "SWITCHYARD_COORDINATOR", required_unless_present = "reference", value_parser = super::values::parse_endpoint)]
    pub coordinator: Option<String>,

    /// Drive the in-process reference layer instead of a cluster (the baseline; uses the model flags).
    #[arg(long, env = "SWITCHYARD_LOADTEST_REFERENCE")]
    pub reference: bool,

    /// Where --reference computes: auto (CUDA if available, else CPU), cpu, cuda or cuda:N.
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,

    /// The dtype --reference keeps experts in and computes in (as the workers' --dtype). Default:
    /// the checkpoint's own; bf16 on a GPU and f32 on a CPU for synthetic models.
    #[arg(long, env = "SWITCHYARD_DTYPE", value_enum)]
    pub dtype: Option<DtypeArg>,

    #[command(flatten)]
    pub load: LoadArgs,

    /// The model of --reference (a cluster's model comes from its routing table).
    #[command(flatten)]
    pub model: ModelArgs,

    /// Serve the client's Prometheus metrics (time breakdown histograms, bytes, calls) on this
    /// address, e.g. 0.0.0.0:9092, while the test runs.
    #[arg(long, env = "SWITCHYARD_LOADTEST_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Check the flags and environment against the model flags, print what would run and exit
    /// without connecting (used by the Helm chart's tests).
    #[arg(long, env = "SWITCHYARD_CHECK_CONFIG")]
    pub check_config: bool,
}

/// `--check-config`, or a load test of the cluster at `--coordinator`.
pub async fn run(args: LoadtestArgs) -> anyhow::Result<()> {
    if args.check_config {
        let model = args.model.spec()?;
        let routing = args.load.routing(&model)?;
        if let Some(coordinator) = &args.coordinator {
            coordinator.parse::<tonic::transport::Uri>().with_context(|| format!("--coordinator {coordinator}"))?;
        }
        println!("configuration ok: {:#?}\n{routing:#?}", args.load.spec(&model));
        return Ok(());
    }
    let coordinator = args.coordinator.as_deref().context("--coordinator is required")?;
    let (client, _watcher, workers) = connect(coordinator, &args.load).await?;
    let _metrics = match args.metrics_listen {
        Some(address) => Some(serve_metrics(&client, address).await?),
        None => None,
    };
    let table = client.table().context("no routing table")?;
    let skew = args.load.skew.resolve(Some(&table), args.load.layer(&table.model))?;
    let spec = LoadSpec { routing: client.options().routing, skew, ..args.load.spec(&table.model) };
    let name = format!("distributed ({workers} workers)");
    let report = loadtest::run(Target::Distributed(client), spec, &name).await?;
    report_and_finish(&args, report, &table.model)
}

pub(crate) fn report_and_finish(
    args: &LoadtestArgs,
    report: loadtest::LoadReport,
    model: &ModelSpec,
) -> anyhow::Result<()> {
    let summary = report.summary();
    print!("{}", switchyard_loadtest::report::text::load_report(&summary));
    args.load.finish(vec![summary], model)
}

/// Serves `client`'s metrics on `address` until the returned sender is dropped.
async fn serve_metrics(
    client: &MoeClient,
    address: std::net::SocketAddr,
) -> anyhow::Result<tokio::sync::oneshot::Sender<()>> {
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("binding {address}"))?;
    eprintln!("client metrics on http://{}/metrics", listener.local_addr()?);
    let mut registry = prometheus_client::registry::Registry::default();
    client.metrics().register(&mut registry);
    switchyard_common::process_metrics::register(&mut registry, "client");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let readiness = switchyard_common::readiness::Readiness::ready();
    tokio::spawn(switchyard_common::metrics_http::serve(listener, Arc::new(registry), readiness, async {
        let _ = stopped.await;
    }));
    Ok(stop)
}

/// A client following `coordinator`'s routing table, once every expert is placed. The client keeps
/// following new tables while the returned watcher lives.
pub async fn connect(coordinator: &str, load: &LoadArgs) -> anyhow::Result<(Arc<MoeClient>, TableWatcher, usize)> {
    super::coordinator::reach(coordinator).await?;
    let watcher = TableWatcher::start(coordinator)?;
    let table = super::coordinator::wait_for_placement(&watcher, load.placement_timeout).await?;
    // Refused here, before the calls' inputs are made (as large as the batches), rather than by
    // every call.
    let largest = table.max_batch_tokens as usize;
    anyhow::ensure!(
        largest == 0 || load.tokens <= largest,
        "--tokens {}: the cluster takes at most {largest} tokens per call (the coordinator's --max-batch-tokens)",
        load.tokens
    );
    load.check_layers(&table.model)?;
    let options = load.client_options(load.routing(&table.model)?);
    let client = Arc::new(MoeClient::new(watcher.receiver(), options));
    Ok((client, watcher, table.workers().len()))
}
