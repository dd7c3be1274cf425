//! Command-line flags (each with an environment fallback, named as the Helm chart sets them) and the
//! validated configuration built from them.

use std::net::SocketAddr;
use std::time::Duration;

use switchyard_common::tracing_setup::LogFormat;
use switchyard_experts::DeviceChoice;

/// An expert worker: serves the MoE experts the coordinator assigns to it, with libtorch on CUDA
/// when present (else CPU), behind one bounded queue per expert whose limit is the expert capacity.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "switchyard-worker", version)]
pub struct Args {
    /// Address the gRPC server binds (port 0 picks a free port; see the SWITCHYARD_READY line).
    #[arg(long, env = "SWITCHYARD_WORKER_LISTEN", default_value = "0.0.0.0:50061")]
    pub listen: SocketAddr,

    /// Address the Prometheus /metrics endpoint binds.
    #[arg(long, env = "SWITCHYARD_WORKER_METRICS_LISTEN", default_value = "0.0.0.0:9091")]
    pub metrics_listen: SocketAddr,

    /// Endpoint the coordinator and clients dial, e.g. http://worker-0.workers:50061.
    /// Default: http://<listen address>:<bound port>, with 127.0.0.1 for an unspecified address.
    #[arg(long, env = "SWITCHYARD_WORKER_ADVERTISE")]
    pub advertise: Option<String>,

    /// Coordinator to register with, e.g. http://127.0.0.1:50051. Without it the worker serves only
    /// experts loaded through its own LoadExperts RPC.
    #[arg(long, env = "SWITCHYARD_COORDINATOR")]
    pub coordinator: Option<String>,

    /// Name shown in cluster status and logs. Default: the advertised endpoint.
    #[arg(long, env = "SWITCHYARD_WORKER_NAME")]
    pub name: Option<String>,

    /// Where experts run: auto (CUDA if available, else CPU), cpu, cuda or cuda:N.
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,

    /// libtorch intra-op threads. Give each process its share of the cores: with two processes on
    /// two cores, 2 threads each can be 5-10x slower than 1.
    #[arg(long, env = "SWITCHYARD_TORCH_THREADS", default_value_t = 1)]
    pub torch_threads: u32,

    /// How long the oldest queued rows of an expert wait for rows of other requests to merge with.
    #[arg(long, env = "SWITCHYARD_BATCH_WAIT_US", default_value_t = 100)]
    pub batch_wait_us: u64,

    /// Most rows one merged expert forward takes.
    #[arg(long, env = "SWITCHYARD_MAX_BATCH_TOKENS", default_value_t = 8192)]
    pub max_batch_tokens: usize,

    /// Queue limit per expert, in tokens, for experts loaded without one (the coordinator sends the
    /// model's expert capacity with each assignment).
    #[arg(long, env = "SWITCHYARD_QUEUE_LIMIT_TOKENS", default_value_t = 4096)]
    pub queue_limit_tokens: usize,

    /// Memory offered to expert weights, in bytes; 0 reads MemAvailable from /proc/meminfo.
    #[arg(long, env = "SWITCHYARD_WORKER_MEMORY_BYTES", default_value_t = 0)]
    pub memory_bytes: u64,

    /// Serve identity experts (each answers with its input, no compute, no weights) to measure
    /// dispatch and combine alone, as DeepEP's benchmarks do.
    #[arg(long, env = "SWITCHYARD_IDENTITY_EXPERTS")]
    pub identity_experts: bool,

    /// Also export per-expert Prometheus series (admitted and refused tokens per layer and expert).
    /// Off by default: a large model makes thousands of series.
    #[arg(long, env = "SWITCHYARD_PER_EXPERT_METRICS")]
    pub per_expert_metrics: bool,

    /// Log line format.
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Check the flags and environment, print the configuration they make and exit without
    /// binding a port or loading libtorch's device (used by the Helm chart's tests).
    #[arg(long, env = "SWITCHYARD_CHECK_CONFIG")]
    pub check_config: bool,
}

impl Args {
    /// Checks what clap cannot: endpoints are http(s) URIs with a host, sizes are positive. The
    /// error names the flag.
    pub fn check(&self) -> Result<(), String> {
        for (flag, uri) in [("--advertise", &self.advertise), ("--coordinator", &self.coordinator)] {
            if let Some(uri) = uri {
                check_endpoint(uri).map_err(|reason| format!("{flag} {uri}: {reason}"))?;
            }
        }
        for (flag, value) in [
            ("--torch-threads", self.torch_threads as usize),
            ("--max-batch-tokens", self.max_batch_tokens),
            ("--queue-limit-tokens", self.queue_limit_tokens),
        ] {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        Ok(())
    }

    pub fn batch_wait(&self) -> Duration {
        Duration::from_micros(self.batch_wait_us)
    }

    /// The advertised endpoint for a server bound at `bound`.
    pub fn advertised_endpoint(&self, bound: SocketAddr) -> String {
        if let Some(endpoint) = &self.advertise {
            return endpoint.clone();
        }
        let host = if bound.ip().is_unspecified() { "127.0.0.1".to_owned() } else { bound.ip().to_string() };
        format!("http://{host}:{}", bound.port())
    }

    pub fn offered_memory_bytes(&self) -> u64 {
        if self.memory_bytes > 0 {
            return self.memory_bytes;
        }
        available_memory_bytes().unwrap_or(8 << 30)
    }
}

fn check_endpoint(uri: &str) -> Result<(), String> {
    let parsed: tonic::transport::Uri = uri.parse().map_err(|error| format!("not a URI ({error})"))?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) {
        return Err("the scheme must be http or https".into());
    }
    if parsed.host().is_none_or(str::is_empty) {
        return Err("a host is missing".into());
    }
    Ok(())
}

fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_parse_and_the_endpoint_follows_the_bound_port() {
        let args = Args::try_parse_from(["switchyard-worker"]).expect("defaults are valid");
        let bound: SocketAddr = "0.0.0.0:43210".parse().expect("address");
        assert_eq!(args.advertised_endpoint(bound), "http://127.0.0.1:43210");
        assert!(args.offered_memory_bytes() > 0);
        let args = Args::try_parse_from(["switchyard-worker", "--advertise", "http://w-0:1", "--device", "cpu"])
            .expect("valid");
        assert_eq!(args.advertised_endpoint(bound), "http://w-0:1");
        assert!(Args::try_parse_from(["switchyard-worker", "--device", "tpu"]).is_err());
    }
}
