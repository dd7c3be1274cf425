//! `switchyard local`.

use std::time::Duration;

use anyhow::Context;
use switchyard_common::tracing_setup::TracingArgs;
use switchyard_loadtest::loadtest::{self, LoadSpec, LoadSummary, Target};
use switchyard_loadtest::local_cluster::{Hosts, LocalCluster, LocalClusterConfig};
use switchyard_loadtest::shaped_network::{CongestionControl, LinkRate};
use switchyard_model::cli::ModelArgs;
use switchyard_model::{ModelSpec, WeightDtype};

use super::load_args::LoadArgs;
use super::loadtest::connect;
use super::values::DtypeArg;

/// A later flag overrides an earlier one, so `scripts/run.sh` can give defaults that its own
/// arguments replace (`scripts/run.sh --duration 20s`).
#[derive(Debug, clap::Args)]
#[command(args_override_self = true)]
pub struct LocalArgs {
    /// Expert workers to start (at least one: the coordinator places experts only on workers).
    #[arg(long, env = "SWITCHYARD_LOCAL_WORKERS", default_value_t = 2, value_parser = super::values::parse_count::<usize>)]
    pub workers: usize,

    /// libtorch threads per worker (give each process its share of the cores).
    #[arg(long, env = "SWITCHYARD_WORKER_TORCH_THREADS", default_value_t = 1, value_parser = super::values::parse_count::<u32>)]
    pub worker_torch_threads: u32,

    /// The dtype the workers (and the --compare-reference layer) keep experts in and compute in.
    /// Default: the checkpoint's own; bf16 on a GPU and f32 on a CPU for synthetic models.
    #[arg(long, env = "SWITCHYARD_DTYPE", value_enum)]
    pub dtype: Option<DtypeArg>,

    /// Batch wait bound of the workers, in microseconds: how long queued rows may wait for
    /// requests still on their way in (none on the way: no wait).
    #[arg(long, env = "SWITCHYARD_BATCH_WAIT_US", default_value_t = 100)]
    pub batch_wait_us: u64,

    /// Run a load test against the cluster, print its report, stop the cluster and exit.
    #[arg(long, env = "SWITCHYARD_LOCAL_LOADTEST")]
    pub loadtest: bool,

    /// Run every connection over mutual TLS: a development CA written to a fresh folder (printed),
    /// a certificate for this process, and one for each coordinator and worker signed as it
    /// starts, naming its role and the address it listens on (its own host's with --link-rate).
    #[arg(long, env = "SWITCHYARD_LOCAL_TLS")]
    pub tls: bool,

    /// Put the coordinator and each worker on a host of its own (a Linux network namespace with
    /// its own address), each worker behind a link of this rate in each direction (tbf on a veth
    /// pair), e.g. 1gbit, 10gbit, 25gbit; this process is the client on another. Needs
    /// CAP_NET_ADMIN (root); everything is removed when the command ends, Ctrl-C included.
    #[arg(long, env = "SWITCHYARD_LOCAL_LINK_RATE")]
    pub link_rate: Option<LinkRate>,

    /// With --link-rate: the TCP congestion control of every host of the cluster, this process's
    /// connections to them included: cubic (the kernel's default, what a cluster's hosts run unless
    /// tuned), bbr, dctcp, reno, or machine (this machine's own default).
    #[arg(long, env = "SWITCHYARD_LOCAL_LINK_CONGESTION", default_value_t, requires = "link_rate")]
    pub link_congestion: CongestionControl,

    /// With --loadtest: then run the same load through the in-process reference layer, for comparison
    /// (with as many libtorch threads as all workers had together).
    #[arg(long, env = "SWITCHYARD_LOCAL_COMPARE_REFERENCE", requires = "loadtest")]
    pub compare_reference: bool,

    #[command(flatten)]
    pub load: LoadArgs,

    #[command(flatten)]
    pub model: ModelArgs,
}

/// Starts the cluster and, without `--loadtest`, serves until Ctrl-C. With it, runs the load test,
/// prints its report and checks its thresholds.
pub async fn run(args: LocalArgs, tracing: &TracingArgs) -> anyhow::Result<()> {
    match load_test_cluster(&args, tracing).await? {
        Some(ClusterRun { report, model, .. }) => args.load.finish(vec![report], &model),
        None => Ok(()),
    }
}

/// What the cluster's load test measured, and what to run a baseline with.
pub(crate) struct ClusterRun {
    pub report: LoadSummary,
    #[allow(dead_code, reason = "only switchyard-torch runs a baseline with it")]
    pub spec: LoadSpec,
    pub model: ModelSpec,
}

/// The cluster's part of `local`: `None` when it served until Ctrl-C instead of a load test. Ctrl-C
/// at any point ends it through the destructors: the processes killed, the namespaces removed.
pub(crate) async fn load_test_cluster(args: &LocalArgs, tracing: &TracingArgs) -> anyhow::Result<Option<ClusterRun>> {
    tokio::select! {
        run = run_cluster(args, tracing) => run,
        () = switchyard_common::shutdown::signal() => {
            eprintln!("stopping the cluster");
            if args.loadtest {
                anyhow::bail!("interrupted before the load test finished");
            }
            Ok(None)
        }
    }
}

async fn run_cluster(args: &LocalArgs, tracing: &TracingArgs) -> anyhow::Result<Option<ClusterRun>> {
    let model = args.model.spec()?;
    let me = std::env::current_exe().context("locating the switchyard binary")?;
    let mut config = LocalClusterConfig::next_to(&me, model.clone(), args.workers);
    config.torch_threads = args.worker_torch_threads;
    config.tracing = tracing.clone();
    if let Some(rate) = args.link_rate {
        config.hosts = Hosts::Namespaces { worker_link: Some(rate), congestion: args.link_congestion };
    }
    config.worker_args = vec!["--batch-wait-us".into(), args.batch_wait_us.to_string()];
    let dtype: Option<WeightDtype> = args.dtype.map(Into::into);
    if let Some(dtype) = dtype {
        config.worker_args.extend(["--dtype".into(), dtype.name().into()]);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        config.log_filter = Some("warn".into());
    }
    if args.tls {
        use switchyard_common::tls::{self, ClientTls, Role};
        let dir = std::env::temp_dir().join(format!("switchyard-local-certs-{}", std::process::id()));
        tls::write_dev_certs(&dir, &["localhost".to_owned(), "127.0.0.1".to_owned()], &[])?;
        // Each process gets a certificate of its own from this CA, naming the host it runs on.
        config.dev_tls = Some(dir.clone());
        tls::use_for_outgoing(ClientTls::load(tls::dev_files(&dir, Role::Client))?);
        eprintln!("mutual TLS on every connection; certificates in {}", dir.display());
    }
    let hosts = match args.link_rate {
        Some(rate) => {
            format!(
                "each on a host of its own, workers behind {rate} links, TCP congestion control {}",
                args.link_congestion
            )
        }
        None => "on 127.0.0.1".to_owned(),
    };
    eprintln!("starting a coordinator and {} workers {hosts} (model {})...", args.workers, model.summary());
    let mut cluster = LocalCluster::start(config).await?;
    let (client, _watcher, workers) = connect(&cluster.coordinator_uri(), &args.load).await?;
    eprintln!("cluster ready: coordinator {} with {workers} workers", cluster.coordinator_uri());
    for worker in &cluster.workers {
        eprintln!("  {} grpc {} metrics http://{}/metrics", worker.name, worker.grpc_uri(), worker.metrics);
    }

    if !args.loadtest {
        println!("coordinator {}", cluster.coordinator_uri());
        eprintln!("press Ctrl-C to stop");
        // Ctrl-C ends the caller's wait, which drops the cluster.
        return Ok(std::future::pending().await);
    }

    eprintln!("load test: {}...", args.load.window());
    let layer = args.load.layer(&model);
    let skew = args.load.skew.resolve(client.table().as_deref(), layer)?;
    let spec = LoadSpec { routing: client.options().routing, skew, ..args.load.spec(&model) };
    let name = format!(
        "distributed ({workers} workers), {}",
        spec.routing.policy.map_or("the model's router", |policy| policy.name())
    );
    let report = loadtest::run(Target::Distributed(client), spec.clone(), &name).await;
    let report = match report {
        Ok(report) => report,
        Err(error) => {
            cluster.stop(Duration::from_secs(5)).await;
            return Err(error.into());
        }
    };
    let report = report.summary();
    print!("{}", switchyard_loadtest::report::text::load_report(&report));
    cluster.stop(Duration::from_secs(5)).await;

    Ok(Some(ClusterRun { report, spec, model }))
}
