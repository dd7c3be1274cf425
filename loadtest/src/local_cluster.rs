//! A coordinator and N expert workers as child processes on 127.0.0.1, each on a port it picked
//! itself (port 0) and announced; or, with [`Hosts::Namespaces`], each in its own network
//! namespace with its own address, the workers' links shaped to a rate ([`ShapedNetwork`]). Used
//! by `switchyard local`, `switchyard bench` and the integration tests. Every child dies with this
//! handle (drop) and with this process (even on SIGKILL); the namespaces go with the handle.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use switchyard_common::children::{ChildError, ChildProcess};
use switchyard_common::tls::{self, Role, TlsArgs, TlsError};
use switchyard_common::tracing_setup::TracingArgs;
use switchyard_model::ModelSpec;

use crate::shaped_network::{CongestionControl, Host, LinkRate, NetworkError, ShapedNetwork};

/// Where the cluster's processes live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Hosts {
    /// Every process on 127.0.0.1 in this namespace.
    #[default]
    Loopback,
    /// The coordinator and each worker in a network namespace of its own, reached over a bridge;
    /// each worker's link shaped to `worker_link` in both directions when given, every host's TCP
    /// (this process's towards them included) running `congestion`. Needs CAP_NET_ADMIN.
    Namespaces { worker_link: Option<LinkRate>, congestion: CongestionControl },
}

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalClusterConfig {
    pub coordinator_bin: PathBuf,
    pub worker_bin: PathBuf,
    pub workers: usize,
    /// Workers the coordinator waits for before it places experts (`--min-workers`): all of them
    /// unless told otherwise.
    pub min_workers: usize,
    pub model: ModelSpec,
    /// Tokens per call the cluster is sized for: the expert queue limit is this batch's capacity.
    pub max_batch_tokens: usize,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// libtorch threads per worker.
    pub torch_threads: u32,
    /// More flags for every worker (e.g. `--batch-wait-us`).
    pub worker_args: Vec<String>,
    /// More flags for the coordinator (e.g. `--replicas`).
    pub coordinator_args: Vec<String>,
    /// Loopback, or namespaces joined by (shaped) links.
    pub hosts: Hosts,
    /// `RUST_LOG` for the children; `None` passes ours through.
    pub log_filter: Option<String>,
    /// How the children write their log lines (`SWITCHYARD_LOG_FORMAT`) and where they export
    /// their spans (`OTEL_EXPORTER_OTLP_ENDPOINT`): as this process does, so that JSON logs are
    /// not mixed with text ones and a call's trace has every process's spans.
    pub tracing: TracingArgs,
    /// A development CA's folder ([`tls::write_dev_certs`]): every process then serves and dials
    /// mutual TLS with a certificate of its own that the CA's key signs at its start, naming its
    /// role and the address it listens on (on namespaced hosts known only then). `None`:
    /// plaintext, unless the args carry certificates.
    pub dev_tls: Option<PathBuf>,
}

impl LocalClusterConfig {
    /// Finds the coordinator and worker binaries next to `sibling` (normally the running binary).
    pub fn next_to(sibling: &Path, model: ModelSpec, workers: usize) -> Self {
        let dir = sibling.parent().map(Path::to_path_buf).unwrap_or_default();
        Self {
            coordinator_bin: dir.join("switchyard-coordinator"),
            worker_bin: dir.join("switchyard-worker"),
            workers,
            min_workers: workers,
            model,
            max_batch_tokens: 8192,
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(3),
            torch_threads: 1,
            worker_args: Vec::new(),
            coordinator_args: Vec::new(),
            hosts: Hosts::Loopback,
            log_filter: None,
            tracing: TracingArgs::default(),
            dev_tls: None,
        }
    }
}

impl LocalClusterConfig {
    fn envs(&self) -> Vec<(String, String)> {
        let filter = self.log_filter.iter().map(|filter| ("RUST_LOG".to_owned(), filter.clone()));
        filter.chain(self.tracing.child_env()).collect()
    }
}

/// A development CA, and the folder in it where one cluster's processes get their certificates.
#[derive(Debug)]
struct Certificates {
    ca: PathBuf,
    folder: PathBuf,
}

impl Certificates {
    /// For `config`'s CA, a folder of this cluster's own: clusters of one process may share a CA
    /// and run at once.
    fn of(config: &LocalClusterConfig) -> Option<Self> {
        static CLUSTERS: AtomicU64 = AtomicU64::new(0);
        let ca = config.dev_tls.clone()?;
        let folder = ca.join(format!("hosts-{}-{}", std::process::id(), CLUSTERS.fetch_add(1, Ordering::Relaxed)));
        Some(Self { ca, folder })
    }

    /// The flags of the process `name` in `role` on `host` (loopback when `None`): a certificate
    /// naming its role and the addresses it is dialled by.
    fn flags(&self, (role, name): (Role, &str), host: Option<&Host>) -> Result<Vec<String>, TlsError> {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        names.extend(host.map(|host| host.address.to_string()));
        let files = tls::write_host_certificate(&self.ca, role, name, &names, &self.folder)?;
        Ok(TlsArgs::flags(&files))
    }
}

/// The TLS flags of a process: a certificate of its own when the cluster has a CA, none when
/// `args` carry certificates, else plaintext (`--insecure`, as the servers require it be said).
fn tls_flags(
    certificates: Option<&Certificates>,
    process: (Role, &str),
    host: Option<&Host>,
    args: &[String],
) -> Result<Vec<String>, TlsError> {
    match certificates {
        Some(certificates) => certificates.flags(process, host),
        None if args.iter().any(|arg| arg == "--tls-cert") => Ok(Vec::new()),
        None => Ok(vec!["--insecure".to_owned()]),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalClusterError {
    #[error("{0} not found: build the workspace first (cargo build --release --workspace --bins)")]
    MissingBinary(String),
    #[error(transparent)]
    Child(#[from] ChildError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(
        "certificates given to processes on namespaced hosts would have to name addresses chosen at start: give the cluster a development CA instead (switchyard local --tls)"
    )]
    TlsOnNamespaces,
    #[error("certificates: {0}")]
    Tls(#[from] TlsError),
}

#[derive(Debug)]
pub struct LocalCluster {
    pub coordinator: ChildProcess,
    pub workers: Vec<ChildProcess>,
    config: LocalClusterConfig,
    /// The coordinator's host and each worker's, on namespaced hosts.
    coordinator_host: Option<Host>,
    worker_hosts: Vec<Host>,
    /// This cluster's processes' certificates, with a development CA.
    certificates: Option<Certificates>,
    /// Last: dropped after the processes in its namespaces.
    network: Option<ShapedNetwork>,
}

const READY_WITHIN: Duration = Duration::from_secs(60);

impl LocalCluster {
    /// Starts the coordinator, then the workers; returns once each announced its ports.
    pub async fn start(config: LocalClusterConfig) -> Result<Self, LocalClusterError> {
        for binary in [&config.coordinator_bin, &config.worker_bin] {
            if !binary.exists() {
                return Err(LocalClusterError::MissingBinary(binary.display().to_string()));
            }
        }
        let (network, coordinator_host) = match config.hosts {
            Hosts::Loopback => (None, None),
            Hosts::Namespaces { congestion, .. } => {
                if config.coordinator_args.iter().chain(&config.worker_args).any(|arg| arg == "--tls-cert") {
                    return Err(LocalClusterError::TlsOnNamespaces);
                }
                let (network, host) = blocking(move || {
                    let mut network = ShapedNetwork::create(congestion)?;
                    let host = network.add_host("coordinator", None)?;
                    Ok::<_, NetworkError>((network, host))
                })
                .await?;
                (Some(network), Some(host))
            }
        };
        let certificates = Certificates::of(&config);
        let coordinator = spawn_coordinator(&config, certificates.as_ref(), coordinator_host.as_ref(), None).await?;
        let mut cluster = Self {
            coordinator,
            workers: Vec::new(),
            config,
            coordinator_host,
            worker_hosts: Vec::new(),
            certificates,
            network,
        };
        for index in 0..cluster.config.workers {
            cluster.start_worker(index).await?;
        }
        Ok(cluster)
    }

    /// The namespaces and links, on namespaced hosts.
    pub fn network(&self) -> Option<&ShapedNetwork> {
        self.network.as_ref()
    }

    /// Each worker's host (namespace, address, link rate), in `workers`' order, on namespaced hosts.
    pub fn worker_hosts(&self) -> &[Host] {
        &self.worker_hosts
    }

    /// Starts one more worker (named after its position) and returns its index in `workers`.
    pub async fn add_worker(&mut self) -> Result<usize, LocalClusterError> {
        let index = self.workers.len();
        self.start_worker(index).await?;
        Ok(index)
    }

    /// Kills the coordinator (SIGKILL, as a crash) and starts a new one on the same address.
    pub async fn restart_coordinator(&mut self) -> Result<(), LocalClusterError> {
        self.coordinator.kill().await;
        let address = self.coordinator.grpc;
        self.coordinator =
            spawn_coordinator(&self.config, self.certificates.as_ref(), self.coordinator_host.as_ref(), Some(address))
                .await?;
        Ok(())
    }

    /// A host of its own for worker `index`, behind a link of `rate`.
    async fn add_worker_host(&mut self, index: usize, rate: Option<LinkRate>) -> Result<Host, LocalClusterError> {
        let mut network = self.network.take().expect("a cluster on namespaced hosts has its network");
        // `ip` and `tc` block: off the runtime's threads, the network handed there and back.
        let (network, host) = blocking(move || {
            let host = network.add_host(&format!("w{index}"), rate);
            (network, host)
        })
        .await;
        self.network = Some(network);
        let host = host?;
        self.worker_hosts.push(host.clone());
        Ok(host)
    }

    async fn start_worker(&mut self, index: usize) -> Result<(), LocalClusterError> {
        let host = match self.config.hosts {
            Hosts::Namespaces { worker_link, .. } => Some(self.add_worker_host(index, worker_link).await?),
            Hosts::Loopback => None,
        };
        let listen = listen_address(host.as_ref());
        let mut args = vec![
            "--listen".to_owned(),
            listen.clone(),
            "--metrics-listen".to_owned(),
            listen,
            "--coordinator".to_owned(),
            self.coordinator.grpc_uri(),
            "--name".to_owned(),
            format!("worker-{index}"),
            "--torch-threads".to_owned(),
            self.config.torch_threads.to_string(),
        ];
        if let Some(checkpoint) = &self.config.model.checkpoint {
            // The workers read the served checkpoint, and nothing else a LoadExperts could name.
            args.extend(["--model-root".to_owned(), checkpoint.clone()]);
        }
        args.extend(self.config.worker_args.iter().cloned());
        let name = format!("worker-{index}");
        args.extend(tls_flags(self.certificates.as_ref(), (Role::Worker, &name), host.as_ref(), &args)?);
        let worker = ChildProcess::spawn_in(
            host.as_ref().map(|host| host.namespace.as_path()),
            &name,
            &self.config.worker_bin,
            &args,
            &self.config.envs(),
            READY_WITHIN,
        )
        .await?;
        self.workers.push(worker);
        Ok(())
    }

    pub fn coordinator_uri(&self) -> String {
        self.coordinator.grpc_uri()
    }

    /// The process ids of the coordinator and the workers still running.
    pub fn process_ids(&self) -> Vec<u32> {
        std::iter::once(&self.coordinator).chain(&self.workers).filter_map(ChildProcess::pid).collect()
    }

    pub fn model(&self) -> &ModelSpec {
        &self.config.model
    }

    /// SIGTERM to every child, SIGKILL after `grace`. The coordinator goes first: with the whole
    /// cluster stopping there is nowhere to move experts to, so workers stop without draining.
    /// Then every worker at once: one told only after another had stopped would meanwhile warn
    /// that its heartbeats fail, though the whole cluster is going.
    pub async fn stop(&mut self, grace: Duration) {
        self.coordinator.stop(grace).await;
        futures::future::join_all(self.workers.iter_mut().map(|worker| worker.stop(grace))).await;
    }
}

/// Runs blocking work (`ip`, `tc`) off the async runtime's threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.expect("network set-up does not panic")
}

/// Port 0 on the host's address, or on loopback.
fn listen_address(host: Option<&Host>) -> String {
    match host {
        Some(host) => format!("{}:0", host.address),
        None => "127.0.0.1:0".to_owned(),
    }
}

/// The coordinator, on `host` if given, on `grpc` if given (a restart keeps its address).
async fn spawn_coordinator(
    config: &LocalClusterConfig,
    certificates: Option<&Certificates>,
    host: Option<&Host>,
    grpc: Option<std::net::SocketAddr>,
) -> Result<ChildProcess, LocalClusterError> {
    let metrics = listen_address(host);
    let listen = grpc.map_or_else(|| metrics.clone(), |grpc| grpc.to_string());
    let mut args = vec![
        "--listen".to_owned(),
        listen,
        "--metrics-listen".to_owned(),
        metrics,
        "--min-workers".to_owned(),
        // A cluster started without workers (they join later) places on the first to register.
        config.min_workers.max(1).to_string(),
        "--max-batch-tokens".to_owned(),
        config.max_batch_tokens.to_string(),
        "--heartbeat-interval-ms".to_owned(),
        config.heartbeat_interval.as_millis().to_string(),
        "--heartbeat-timeout-ms".to_owned(),
        config.heartbeat_timeout.as_millis().to_string(),
    ];
    args.extend(switchyard_model::cli::flags_for(&config.model));
    args.extend(config.coordinator_args.iter().cloned());
    args.extend(tls_flags(certificates, (Role::Coordinator, "coordinator"), host, &args)?);
    let namespace = host.map(|host| host.namespace.as_path());
    Ok(ChildProcess::spawn_in(namespace, "coordinator", &config.coordinator_bin, &args, &config.envs(), READY_WITHIN)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_common::tracing_setup::LogFormat;

    #[test]
    fn children_write_their_logs_as_this_process_does() {
        let mut config = LocalClusterConfig::next_to(Path::new("/bin/switchyard"), ModelSpec::default_synthetic(), 1);
        assert_eq!(config.envs(), [("SWITCHYARD_LOG_FORMAT".to_owned(), "text".to_owned())]);
        config.tracing.log_format = LogFormat::Json;
        config.tracing.otlp_endpoint = Some("http://collector:4317".into());
        config.log_filter = Some("warn".into());
        let envs = config.envs();
        assert_eq!(
            envs,
            [
                ("RUST_LOG".to_owned(), "warn".to_owned()),
                ("SWITCHYARD_LOG_FORMAT".to_owned(), "json".to_owned()),
                ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), "http://collector:4317".to_owned())
            ]
        );
    }

    #[test]
    fn each_process_gets_a_certificate_of_its_own_the_one_given_or_says_it_is_plaintext() {
        let worker = (Role::Worker, "worker-0");
        assert_eq!(tls_flags(None, worker, None, &[]).expect("flags"), ["--insecure"]);
        let other = ["--max-batch-tokens".to_owned(), "8192".to_owned()];
        assert_eq!(tls_flags(None, worker, None, &other).expect("flags"), ["--insecure"]);
        let given = ["--tls-cert".to_owned(), "/etc/switchyard/worker.pem".to_owned()];
        assert_eq!(tls_flags(None, worker, None, &given).expect("flags"), Vec::<String>::new(), "its own flags stand");

        let ca = tempfile::tempdir().expect("a folder");
        tls::write_dev_certs(ca.path(), &["localhost".to_owned()], &[]).expect("a development CA");
        let mut config = LocalClusterConfig::next_to(Path::new("/bin/switchyard"), ModelSpec::default_synthetic(), 1);
        config.dev_tls = Some(ca.path().to_owned());
        let (first, second) = (Certificates::of(&config).expect("a CA"), Certificates::of(&config).expect("a CA"));
        assert_ne!(first.folder, second.folder, "two clusters of one process keep their certificates apart");
        let host = Host {
            name: "w0".to_owned(),
            namespace: PathBuf::from("/run/netns/w0"),
            address: std::net::Ipv4Addr::new(198, 18, 7, 3),
            rate: None,
        };
        let flags = tls_flags(Some(&first), worker, Some(&host), &given).expect("flags");
        let expected = [
            ("--tls-cert", first.folder.join("worker-0.pem")),
            ("--tls-key", first.folder.join("worker-0-key.pem")),
            ("--tls-ca", ca.path().join("ca.pem")),
        ];
        let expected: Vec<String> =
            expected.iter().flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()]).collect();
        assert_eq!(flags, expected, "the CA's certificate for this process, over any given");
        assert!(first.folder.join("worker-0.pem").exists());
        assert_eq!(listen_address(Some(&host)), "198.18.7.3:0");
        assert_eq!(listen_address(None), "127.0.0.1:0");
    }
}
