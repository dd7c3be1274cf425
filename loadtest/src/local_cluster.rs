//! A coordinator and N expert workers as child processes on 127.0.0.1, each on a port it picked
//! itself (port 0) and announced. Used by `switchyard local` and by the integration tests. Every
//! child dies with this handle (drop) and with this process (even on SIGKILL).

use std::path::{Path, PathBuf};
use std::time::Duration;

use switchyard_common::children::{ChildError, ChildProcess};
use switchyard_common::tracing_setup::TracingArgs;
use switchyard_model::ModelSpec;

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
    /// `RUST_LOG` for the children; `None` passes ours through.
    pub log_filter: Option<String>,
    /// How the children write their log lines (`SWITCHYARD_LOG_FORMAT`) and where they export
    /// their spans (`OTEL_EXPORTER_OTLP_ENDPOINT`): as this process does, so that JSON logs are
    /// not mixed with text ones and a call's trace has every process's spans.
    pub tracing: TracingArgs,
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
            log_filter: None,
            tracing: TracingArgs::default(),
        }
    }
}

impl LocalClusterConfig {
    fn envs(&self) -> Vec<(String, String)> {
        let filter = self.log_filter.iter().map(|filter| ("RUST_LOG".to_owned(), filter.clone()));
        filter.chain(self.tracing.child_env()).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalClusterError {
    #[error("{0} not found: build the workspace first (cargo build --release --workspace --bins)")]
    MissingBinary(String),
    #[error(transparent)]
    Child(#[from] ChildError),
}

#[derive(Debug)]
pub struct LocalCluster {
    pub coordinator: ChildProcess,
    pub workers: Vec<ChildProcess>,
    config: LocalClusterConfig,
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
        let coordinator = spawn_coordinator(&config, "127.0.0.1:0").await?;
        let mut cluster = Self { coordinator, workers: Vec::new(), config };
        for index in 0..cluster.config.workers {
            cluster.start_worker(index).await?;
        }
        Ok(cluster)
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
        let address = self.coordinator.grpc.to_string();
        self.coordinator = spawn_coordinator(&self.config, &address).await?;
        Ok(())
    }

    async fn start_worker(&mut self, index: usize) -> Result<(), LocalClusterError> {
        let mut args = vec![
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--metrics-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
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
        plaintext_unless_tls(&mut args);
        let worker = ChildProcess::spawn(
            &format!("worker-{index}"),
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

    pub fn model(&self) -> &ModelSpec {
        &self.config.model
    }

    /// SIGTERM to every child, SIGKILL after `grace`. The coordinator goes first: with the whole
    /// cluster stopping there is nowhere to move experts to, so workers stop without draining.
    pub async fn stop(&mut self, grace: Duration) {
        self.coordinator.stop(grace).await;
        for worker in &mut self.workers {
            worker.stop(grace).await;
        }
    }
}

/// A local cluster on loopback serves plaintext unless it was given certificates: say so, as
/// the servers require.
fn plaintext_unless_tls(args: &mut Vec<String>) {
    if !args.iter().any(|arg| arg == "--tls-cert") {
        args.push("--insecure".to_owned());
    }
}

async fn spawn_coordinator(config: &LocalClusterConfig, listen: &str) -> Result<ChildProcess, LocalClusterError> {
    let mut args = vec![
        "--listen".to_owned(),
        listen.to_owned(),
        "--metrics-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--min-workers".to_owned(),
        config.min_workers.to_string(),
        "--max-batch-tokens".to_owned(),
        config.max_batch_tokens.to_string(),
        "--heartbeat-interval-ms".to_owned(),
        config.heartbeat_interval.as_millis().to_string(),
        "--heartbeat-timeout-ms".to_owned(),
        config.heartbeat_timeout.as_millis().to_string(),
    ];
    args.extend(switchyard_model::cli::flags_for(&config.model));
    args.extend(config.coordinator_args.iter().cloned());
    plaintext_unless_tls(&mut args);
    Ok(ChildProcess::spawn("coordinator", &config.coordinator_bin, &args, &config.envs(), READY_WITHIN).await?)
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
}
