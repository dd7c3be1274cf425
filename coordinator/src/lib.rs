//! The Switchyard coordinator: membership, expert placement, the versioned routing table.
//!
//! [`service`] (gRPC adapter) → [`cluster::Cluster`] (membership and the reconcile loop) →
//! [`placement`] (pure policy) and [`control`] (telling workers what to load). It never sees a token.

pub mod balance;
pub mod cluster;
pub mod config;
pub mod control;
pub mod error;
pub mod metrics;
pub mod placement;
pub mod service;

use std::future::Future;

use switchyard_common::grpc_metrics::GrpcServerMetrics;
use switchyard_common::readiness::Readiness;
use switchyard_common::tls::{Role, RolePolicy, ServerTls};
use tokio::net::TcpListener;

pub use config::Args;

use crate::cluster::{Cluster, ClusterConfig};
use crate::control::GrpcWorkerControl;

/// Which roles may call each coordinator method under mutual TLS: workers join, beat and drain;
/// clients (and tools) read the table and the status; any member may ask its health.
pub fn allowed_roles(path: &str) -> &'static [Role] {
    match path.rsplit('/').next() {
        _ if path.starts_with("/grpc.health.") => &Role::ALL,
        Some("RegisterWorker" | "Heartbeat" | "DrainWorker") => &[Role::Worker],
        _ => &[Role::Client],
    }
}

/// Serves the coordinator on `grpc` and `metrics_listener` until `shutdown` resolves; over mutual
/// TLS when `tls` is given, each call checked against [`allowed_roles`].
pub async fn run(
    grpc: TcpListener,
    metrics_listener: TcpListener,
    config: ClusterConfig,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grpc_addr = grpc.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    let metrics = metrics::CoordinatorMetrics::default();
    let grpc_metrics = GrpcServerMetrics::default();
    let registry = metrics.registry(&grpc_metrics);
    tracing::info!(%grpc_addr, %metrics_addr, model = %config.model.name, moe_layers = config.model.moe_layers.len(), experts_per_layer = config.model.experts_per_layer, d_model = config.model.d_model, d_ff = config.model.d_ff, top_k = config.model.top_k, queue_limit_tokens = config.queue_limit_tokens, "coordinator listening");
    let cluster = Cluster::new(config, GrpcWorkerControl::default(), metrics);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<switchyard_proto::v1::coordinator_server::CoordinatorServer<
            service::CoordinatorService<GrpcWorkerControl>,
        >>()
        .await;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait_stop = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let reconcile = tokio::spawn(cluster.clone().run(wait_stop(stopped.clone())));
    let metrics_task = tokio::spawn(switchyard_common::metrics_http::serve(
        metrics_listener,
        registry,
        Readiness::ready(),
        wait_stop(stopped.clone()),
    ));

    switchyard_common::ready::announce(grpc_addr, metrics_addr);
    let service = switchyard_proto::v1::coordinator_server::CoordinatorServer::new(service::CoordinatorService::new(
        cluster, stopped,
    ));
    let stop_streams = stop.clone();
    let shutdown = async move {
        shutdown.await;
        let _ = stop_streams.send(true);
    };
    let routes = tonic::service::Routes::new(health_service).add_service(service);
    let tls = tls.map(|tls| (tls, allowed_roles as RolePolicy));
    let serving = switchyard_common::transport::serve(routes, grpc, tls, grpc_metrics, shutdown);
    let serving = async { serving.await.map_err(std::io::Error::other) };
    let served = serve_while_reconciling(serving, reconcile, || {
        stop.send_replace(true);
    })
    .await;
    // Sent already unless the loop panicked; `/metrics` stops on it either way.
    stop.send_replace(true);
    let _ = metrics_task.await;
    served
}

/// `serving` until it ends, then `stop` and the reconcile loop's end. The loop ends by itself
/// only when shutdown has begun (`stop` sent); a loop that panics stops serving with an error that
/// says so, and the process exits to be restarted (workers register again, keeping their experts)
/// rather than serve a table nothing updates.
async fn serve_while_reconciling(
    serving: impl Future<Output = std::io::Result<()>>,
    mut reconcile: tokio::task::JoinHandle<()>,
    stop: impl FnOnce(),
) -> std::io::Result<()> {
    tokio::pin!(serving);
    tokio::select! {
        served = &mut serving => {
            stop();
            let _ = reconcile.await;
            served
        }
        ended = &mut reconcile => match ended {
            Err(error) if error.is_panic() => {
                let reason = switchyard_common::panic::message(&*error.into_panic(), "a panic");
                tracing::error!(%reason, "the reconcile loop panicked; stopping the coordinator");
                Err(std::io::Error::other(format!("the reconcile loop panicked: {reason}")))
            }
            _ => serving.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reconcile_loop_that_panics_stops_the_coordinator_with_its_reason() {
        let reconcile = tokio::spawn(async { panic!("placement broke") });
        let stopped = serve_while_reconciling(std::future::pending(), reconcile, || {});
        let error = tokio::time::timeout(std::time::Duration::from_secs(60), stopped)
            .await
            .expect("serving stops without waiting for a shutdown")
            .unwrap_err();
        assert_eq!(error.to_string(), "the reconcile loop panicked: placement broke");
    }

    /// Serving ends first (its listener closed), or the loop does, having seen shutdown begin
    /// while serving drains its calls: either way the coordinator ends as serving did.
    #[tokio::test]
    async fn a_shutdown_ends_serving_and_the_reconcile_loop_in_either_order() {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut loop_stopped = stopped.clone();
        let reconcile = tokio::spawn(async move {
            let _ = loop_stopped.wait_for(|stop| *stop).await;
        });
        let stop = move || {
            stop.send_replace(true);
        };
        serve_while_reconciling(async { Ok(()) }, reconcile, stop).await.expect("served, then the loop stopped");
        assert!(*stopped.borrow(), "the loop was told to stop");

        let (draining, drained) = tokio::sync::oneshot::channel::<()>();
        let reconcile = tokio::spawn(async move { drop(draining) });
        let serving = async move {
            let _ = drained.await;
            // Still draining when the loop's end is seen.
            tokio::task::yield_now().await;
            Err(std::io::Error::other("the listener failed"))
        };
        let error = serve_while_reconciling(serving, reconcile, || {}).await.unwrap_err();
        assert_eq!(error.to_string(), "the listener failed", "serving's own outcome");
    }

    #[test]
    fn each_method_is_served_to_its_roles_only() {
        let roles = |method: &str| allowed_roles(&format!("/switchyard.v1.Coordinator/{method}"));
        for method in ["RegisterWorker", "Heartbeat", "DrainWorker"] {
            assert_eq!(roles(method), [Role::Worker], "{method}");
        }
        for method in ["GetRoutingTable", "WatchRoutingTable", "GetClusterStatus"] {
            assert_eq!(roles(method), [Role::Client], "{method}");
        }
        assert_eq!(allowed_roles("/grpc.health.v1.Health/Check"), Role::ALL);
    }
}
