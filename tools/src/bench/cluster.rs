//! A local cluster of one shape for the bench: a coordinator and workers started as processes,
//! and clients of the wire dtype each point asks for.

use std::sync::Arc;
use std::time::Duration;

use switchyard_experts::device::device_name;
use switchyard_loadtest::local_cluster::{LocalCluster, LocalClusterConfig};
use switchyard_loadtest::shaped_network::Host;
use switchyard_model::ModelSpec;
use switchyard_proto::wire::WireDtype;
use switchyard_router_client::client::{ClientOptions, MoeClient};
use switchyard_router_client::error::ClientError;
use switchyard_router_client::table::TableWatcher;

use super::{BenchError, BenchSettings};

/// A running local cluster of one shape, with a routing-table watcher.
pub(super) struct ShapeCluster {
    cluster: LocalCluster,
    watcher: TableWatcher,
    pub(super) model: ModelSpec,
    /// Every client's options but its wire dtype, which each point chooses.
    client_options: ClientOptions,
}

/// The processes of a cluster of `workers` serving `model`, as `settings` ask for them: the
/// workers compute where and how the in-process reference does.
fn cluster_config(model: ModelSpec, workers: usize, max_tokens: usize, settings: &BenchSettings) -> LocalClusterConfig {
    let mut config = LocalClusterConfig::next_to(&settings.worker_bin, model, workers);
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
            config.worker_args.extend(["--identity-hold-us".into(), settings.identity_hold.as_micros().to_string()]);
        }
    }
    if let Some(dtype) = settings.compute_dtype {
        config.worker_args.extend(["--dtype".into(), dtype.name().into()]);
    }
    if settings.grouped_experts {
        config.worker_args.push("--grouped-experts".into());
    }
    config
}

/// What the bench's clients are told by `settings`; the wire dtype is the point's.
fn client_options(settings: &BenchSettings) -> ClientOptions {
    ClientOptions {
        dispatch: settings.dispatch,
        connections_per_worker: settings.connections_per_worker,
        chunked_dispatch: settings.chunked_dispatch,
        ..ClientOptions::default()
    }
}

impl ShapeCluster {
    pub(super) async fn start(
        model: ModelSpec,
        workers: usize,
        max_tokens: usize,
        settings: &BenchSettings,
    ) -> Result<Self, BenchError> {
        let mut config = cluster_config(model.clone(), workers, max_tokens, settings);
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
            Ok(watcher) => Ok(Self { cluster, watcher, model, client_options: client_options(settings) }),
            Err(error) => {
                cluster.stop(Duration::from_secs(2)).await;
                Err(error.into())
            }
        }
    }

    pub(super) fn client(&self, wire_dtype: WireDtype) -> Arc<MoeClient> {
        let options = ClientOptions { wire_dtype, ..self.client_options.clone() };
        Arc::new(MoeClient::new(self.watcher.receiver(), options))
    }

    /// The workers' hosts, when each sits behind a shaped link of its own (empty on loopback).
    pub(super) fn worker_hosts(&self) -> &[Host] {
        self.cluster.worker_hosts()
    }

    /// The cluster's processes, the coordinator's and the workers'.
    pub(super) fn process_ids(&self) -> Vec<u32> {
        self.cluster.process_ids()
    }

    pub(super) async fn stop(mut self) {
        self.cluster.stop(Duration::from_secs(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use switchyard_model::WeightDtype;
    use switchyard_router_client::DispatchLayout;

    use super::*;
    use crate::bench::tests::settings;

    fn model() -> ModelSpec {
        ModelSpec::default_synthetic()
    }

    #[test]
    fn the_workers_compute_as_the_settings_ask() {
        let settings = BenchSettings { batch_wait_us: 250, worker_torch_threads: 3, ..settings() };
        let config = cluster_config(model(), 2, 64, &settings);
        assert_eq!(config.worker_args, ["--batch-wait-us", "250", "--device", "cpu"]);
        assert_eq!((config.workers, config.max_batch_tokens, config.torch_threads), (2, 64, 3));
        assert_eq!((&config.coordinator_bin, &config.worker_bin), (&settings.coordinator_bin, &settings.worker_bin));
        assert_eq!(config.model, model());
        assert_eq!(config.dev_tls, None);
        let with_tls = BenchSettings { dev_tls: Some("/tmp/ca".into()), ..settings.clone() };
        assert_eq!(cluster_config(model(), 2, 64, &with_tls).dev_tls, with_tls.dev_tls);

        let identity = BenchSettings {
            identity_experts: true,
            identity_hold: Duration::from_millis(2),
            compute_dtype: Some(WeightDtype::Bf16),
            grouped_experts: true,
            batch_wait_us: 0,
            ..settings.clone()
        };
        assert_eq!(
            cluster_config(model(), 1, 8, &identity).worker_args,
            [
                "--batch-wait-us",
                "0",
                "--device",
                "cpu",
                "--identity-experts",
                "--identity-hold-us",
                "2000",
                "--dtype",
                "bf16",
                "--grouped-experts"
            ]
        );
        let without_hold = BenchSettings { identity_experts: true, ..settings };
        assert!(
            cluster_config(model(), 1, 8, &without_hold).worker_args.ends_with(&["--identity-experts".to_owned()]),
            "no hold unless one is asked for"
        );
    }

    #[test]
    fn the_clients_dispatch_as_the_settings_ask() {
        let settings = BenchSettings {
            dispatch: DispatchLayout::ExpertMajor,
            connections_per_worker: 5,
            chunked_dispatch: true,
            ..settings()
        };
        let options = client_options(&settings);
        assert_eq!(options.dispatch, DispatchLayout::ExpertMajor);
        assert_eq!((options.connections_per_worker, options.chunked_dispatch), (5, true));
        let options = client_options(&BenchSettings { connections_per_worker: 1, ..crate::bench::tests::settings() });
        assert_eq!(options.dispatch, DispatchLayout::TokenMajor);
        assert_eq!((options.connections_per_worker, options.chunked_dispatch), (1, false));
    }
}
