//! The Switchyard expert worker.
//!
//! Request path: [`service`] (gRPC adapter, receiving within [`intake`]'s budget) → [`request`] (validation) → [`worker::ExpertWorker`]
//! → [`scheduler`] (bounded per-expert queues, step choice) → [`compute`] (the libtorch thread:
//! [`step`] runs each step, [`staging`] moves its rows to the device and its answers back,
//! [`stacks`] keeps experts stacked for grouped products).
//! [`membership`] registers with the coordinator and heartbeats; [`metrics`] feeds `/metrics`.

pub mod answer_buffers;
pub mod compute;
pub mod config;
pub mod error;
pub mod identity_sum;
pub mod intake;
pub mod membership;
pub mod metrics;
pub mod request;
pub mod scheduler;
pub mod service;
pub mod stacks;
pub mod staging;
pub mod step;
pub mod sums;
pub mod worker;

use std::future::Future;

use switchyard_common::grpc_metrics::GrpcServerMetrics;
use switchyard_common::readiness::Readiness;
use switchyard_common::tls::{ClientTls, Role, RolePolicy, ServerTls};
use switchyard_experts::ResolveDevice;
use tokio::net::TcpListener;

pub use config::Args;
pub use error::WorkerError;
pub use service::ExpertWorkerService;
pub use worker::{ExpertWorker, QueueLimits, WorkerOptions};

/// Which roles may call each worker method under mutual TLS: clients send rows, the coordinator
/// loads and unloads experts; both may read its stats, any member its health.
pub fn allowed_roles(path: &str) -> &'static [Role] {
    match path.rsplit('/').next() {
        _ if path.starts_with("/grpc.health.") => &Role::ALL,
        Some("LoadExperts" | "UnloadExperts") => &[Role::Coordinator],
        Some("GetStats") => &[Role::Client, Role::Coordinator],
        _ => &[Role::Client],
    }
}

/// Serves a worker on `grpc` and `metrics` until `shutdown` resolves, then drains its queues;
/// over mutual TLS when `args` name certificates, each call checked against [`allowed_roles`].
pub async fn run(
    grpc: TcpListener,
    metrics_listener: TcpListener,
    args: Args,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), std::io::Error> {
    let tls = mutual_tls(&args)?;
    let grpc_addr = grpc.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    let device = args.device.resolve();
    let metrics = metrics::WorkerMetrics::new();
    let metrics = if args.per_expert_metrics { metrics.with_per_expert_series() } else { metrics };
    let memory_bytes = args.offered_memory_bytes(device);
    let worker = ExpertWorker::start(worker_options(&args, device, memory_bytes), metrics.clone())?;
    let endpoint = args.advertised_endpoint(grpc_addr);
    let name = args.name.clone().unwrap_or_else(|| endpoint.clone());
    let device_name = switchyard_experts::device::device_name(device);
    let dtype = args.dtype.map_or_else(|| "default".to_owned(), |dtype| dtype.to_string());
    let compute_gflops = compute_rate(&args, device).await;
    tracing::info!(%grpc_addr, %metrics_addr, %endpoint, device = %device_name, %dtype, torch_threads = args.torch_threads, offered_memory_mib = memory_bytes >> 20, compute_gflops, "worker listening");

    // Ready (the named health service, `/readyz`) once the experts the coordinator placed here are
    // loaded; the unnamed service, for liveness, serves throughout.
    let readiness = match args.coordinator {
        Some(_) => Readiness::not_ready("not registered with the coordinator yet"),
        None => Readiness::ready(),
    };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(
        readiness.clone().report_to(health_reporter, <service::WorkerServer as tonic::server::NamedService>::NAME),
    );

    let (registered, registration) = tokio::sync::watch::channel(None);
    let membership_task = args.coordinator.clone().map(|coordinator_uri| {
        let membership = membership::Membership {
            coordinator_uri,
            name: name.clone(),
            endpoint: endpoint.clone(),
            device: device_name.clone(),
            memory_bytes,
            dtype: args.dtype,
            compute_gflops,
        };
        tokio::spawn(membership::run(worker.clone(), membership, registered, readiness.clone()))
    });
    // SIGTERM (a rolling update, a scale-down) drains first: the coordinator moves the experts,
    // clients stop routing here, then the server stops taking calls and finishes those it has.
    let drain_policy = membership::DrainPolicy {
        timeout: std::time::Duration::from_millis(args.drain_timeout_ms),
        settle: std::time::Duration::from_millis(args.drain_settle_ms),
    };
    let coordinator_uri = args.coordinator.clone();
    let stopping = readiness.clone();
    let shutdown = async move {
        shutdown.await;
        stopping.stopping("draining before stopping");
        if let Some(uri) = coordinator_uri {
            tracing::info!("draining before stopping");
            membership::drain(&uri, &registration, drain_policy).await;
        }
    };

    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let grpc_metrics = GrpcServerMetrics::default();
    let metrics_task = tokio::spawn(switchyard_common::metrics_http::serve(
        metrics_listener,
        metrics::registry_with(&metrics, &grpc_metrics),
        readiness,
        async {
            let _ = metrics_stopped.await;
        },
    ));

    switchyard_common::ready::announce(grpc_addr, metrics_addr);
    let routes = tonic::service::Routes::new(health_service).add_service(
        service::ExpertWorkerService::new(worker.clone(), name)
            .into_server(intake::Intake::new(args.max_receiving_bytes)),
    );
    let served = switchyard_common::transport::serve(routes, grpc, tls, grpc_metrics, shutdown).await;
    if let Some(task) = membership_task {
        task.abort();
    }
    worker.shutdown().await;
    let _ = stop_metrics.send(());
    let _ = metrics_task.await;
    served.map_err(std::io::Error::other)
}

/// This worker's server certificates and the roles each call may come from, when `args` name
/// certificates; it then also dials the coordinator as itself.
fn mutual_tls(args: &Args) -> Result<Option<(ServerTls, RolePolicy)>, std::io::Error> {
    let Some(files) = args.tls.files() else { return Ok(None) };
    let server = ServerTls::load(files.clone()).map_err(std::io::Error::other)?;
    switchyard_common::tls::use_for_outgoing(ClientTls::load(files).map_err(std::io::Error::other)?);
    Ok(Some((server, allowed_roles as RolePolicy)))
}

/// What the flags make of the worker itself: its device and threads, batching, queues, experts'
/// dtype, the memory it offers and where it may read checkpoints.
fn worker_options(args: &Args, device: tch::Device, memory_bytes: u64) -> WorkerOptions {
    WorkerOptions {
        device,
        torch_threads: args.torch_threads.max(1) as i32,
        batching: scheduler::BatchingConfig { batch_wait: args.batch_wait(), max_batch_tokens: args.max_batch_tokens },
        default_queue_limit_tokens: args.queue_limit_tokens,
        identity_experts: args.identity_experts,
        step_hold: std::time::Duration::from_micros(args.identity_hold_us),
        grouped_experts: args.grouped_experts,
        dtype: args.dtype,
        memory_bytes: Some(memory_bytes),
        checkpoints: args.model_root.clone().map_or(worker::CheckpointAccess::Nowhere, worker::CheckpointAccess::Under),
        copied_transfers_on_cpu: false,
    }
}

/// `--compute-gflops`, else this device's matrix-multiply rate in the experts' dtype (f32 on a
/// CPU, bf16 on a GPU, unless `--dtype` says), measured off the async runtime's threads; on a CPU
/// by the CPU time the products took, so that a machine busy at the worker's start does not read
/// as a slow one. 0 when the measurement could not run: the coordinator then counts the worker as
/// average.
async fn compute_rate(args: &Args, device: tch::Device) -> f64 {
    if args.compute_gflops > 0.0 {
        return args.compute_gflops;
    }
    let dtype = args.dtype.unwrap_or(if device.is_cuda() {
        switchyard_model::WeightDtype::Bf16
    } else {
        switchyard_model::WeightDtype::F32
    });
    let threads = args.torch_threads.max(1) as i32;
    // Smaller than the bench's yardstick: only the ratio between workers matters here.
    let size = if device.is_cuda() { 4096 } else { 1024 };
    let measured = tokio::task::spawn_blocking(move || {
        switchyard_experts::peak::measure_capability(device, dtype, threads, size, 2)
    })
    .await;
    measured.map_or(0.0, |peak| peak.flops_per_second / 1e9)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn each_method_is_served_to_its_roles_only() {
        let roles = |method: &str| allowed_roles(&format!("/switchyard.v1.ExpertWorker/{method}"));
        for method in ["Forward", "ForwardStream"] {
            assert_eq!(roles(method), [Role::Client], "{method}");
        }
        for method in ["LoadExperts", "UnloadExperts"] {
            assert_eq!(roles(method), [Role::Coordinator], "{method}");
        }
        assert_eq!(roles("GetStats"), [Role::Client, Role::Coordinator]);
        assert_eq!(allowed_roles("/grpc.health.v1.Health/Check"), Role::ALL);
        assert_eq!(allowed_roles("/grpc.health.v1.Health/Watch"), Role::ALL);
        assert_eq!(
            allowed_roles("/other.Service/LoadExperts"),
            [Role::Coordinator],
            "the method decides, not the service"
        );
    }

    #[tokio::test]
    async fn the_compute_rate_is_the_flag_s_else_a_measured_gflops_figure() {
        let mut args = Args::parse_from(["switchyard-worker"]);
        args.compute_gflops = 7.5;
        assert_eq!(compute_rate(&args, tch::Device::Cpu).await, 7.5);
        args.compute_gflops = 0.0;
        let measured = compute_rate(&args, tch::Device::Cpu).await;
        // One CPU thread multiplies f32 at some GFLOP/s: not flop/s, not zero.
        assert!((0.1..10_000.0).contains(&measured), "{measured} GFLOP/s");
    }
}
