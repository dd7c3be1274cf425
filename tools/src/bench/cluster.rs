//! A local cluster of one shape for the bench: a coordinator and workers started as processes,
//! and clients of the wire dtype each point asks for.

use std::sync::Arc;
use std::time::Duration;

use switchyard_experts::device::device_name;
use switchyard_loadtest::local_cluster::{LocalCluster, LocalClusterConfig};
use switchyard_loadtest::shaped_network::Host;
use switchyard_model::ModelSpec;
use switchyard_proto::wire::WireDtype;
use switchyard_router_client::DispatchLayout;
use switchyard_router_client::client::{ClientOptions, MoeClient};
use switchyard_router_client::error::ClientError;
use switchyard_router_client::table::TableWatcher;

use super::{BenchError, BenchSettings};

/// A running local cluster of one shape, with a routing-table watcher.
pub(super) struct ShapeCluster {
    cluster: LocalCluster,
    watcher: TableWatcher,
    pub(super) model: ModelSpec,
    dispatch: DispatchLayout,
    connections_per_worker: usize,
    chunked_dispatch: bool,
}

impl ShapeCluster {
    pub(super) async fn start(
        model: ModelSpec,
        workers: usize,
        max_tokens: usize,
        settings: &BenchSettings,
    ) -> Result<Self, BenchError> {
        let mut config = LocalClusterConfig::next_to(&settings.worker_bin, model.clone(), workers);
        config.coordinator_bin = settings.coordinator_bin.clone();
        config.worker_bin = settings.worker_bin.clone();
        config.max_batch_tokens = max_tokens;
        config.torch_threads = settings.worker_torch_threads;
        config.hosts = settings.hosts;
        config.dev_tls = settings.dev_tls.clone();
        config.worker_args = vec![
            "--batch-wait-us".into(),
            settings.batch_wait_us.to_string(),
            "--device".into(),
            device_name(settings.device),
        ];
        if settings.identity_experts {
            config.worker_args.push("--identity-experts".into());
            if !settings.identity_hold.is_zero() {
                config
                    .worker_args
                    .extend(["--identity-hold-us".into(), settings.identity_hold.as_micros().to_string()]);
            }
        }
        if let Some(dtype) = settings.compute_dtype {
            config.worker_args.extend(["--dtype".into(), dtype.name().into()]);
        }
        if settings.grouped_experts {
            config.worker_args.push("--grouped-experts".into());
        }
        if std::env::var_os("RUST_LOG").is_none() {
            config.log_filter = Some("warn".into());
        }
        let mut cluster = LocalCluster::start(config).await?;
        let connected = async {
            let watcher = TableWatcher::start(&cluster.coordinator_uri())?;
            watcher.wait_for(|table| table.is_complete(), Duration::from_secs(120)).await?;
            Ok::<_, ClientError>(watcher)
        }
        .await;
        match connected {
            Ok(watcher) => Ok(Self {
                cluster,
                watcher,
                model,
                dispatch: settings.dispatch,
                connections_per_worker: settings.connections_per_worker,
                chunked_dispatch: settings.chunked_dispatch,
            }),
            Err(error) => {
                cluster.stop(Duration::from_secs(2)).await;
                Err(error.into())
            }
        }
    }

    pub(super) fn client(&self, wire_dtype: WireDtype) -> Arc<MoeClient> {
        let options = ClientOptions {
            wire_dtype,
            dispatch: self.dispatch,
            connections_per_worker: self.connections_per_worker,
            chunked_dispatch: self.chunked_dispatch,
            ..ClientOptions::default()
        };
        Arc::new(MoeClient::new(self.watcher.receiver(), options))
    }

    /// The workers' hosts, when each sits behind a shaped link of its own (empty on loopback).
    pub(super) fn worker_hosts(&self) -> &[Host] {
        self.cluster.worker_hosts()
    }

    pub(super) async fn stop(mut self) {
        self.cluster.stop(Duration::from_secs(5)).await;
    }
}
