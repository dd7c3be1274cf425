//! Command-line flags (each with an environment fallback, named as the Helm chart sets them) and the
//! validated configuration built from them.

use std::net::SocketAddr;
use std::time::Duration;

use switchyard_common::tracing_setup::TracingArgs;
use switchyard_experts::DeviceChoice;
use switchyard_model::WeightDtype;

/// An expert worker: serves the MoE experts the coordinator assigns to it, with libtorch on CUDA
/// when present (else CPU), behind one bounded queue per expert whose limit is the expert capacity.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "switchyard-worker", version)]
pub struct Args {
    /// Address the gRPC server binds (port 0 picks a free port; see the SWITCHYARD_READY line).
    /// Loopback unless an address is given: other hosts reach it only when asked (`0.0.0.0:…`).
    #[arg(long, env = "SWITCHYARD_WORKER_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,

    /// Address the Prometheus /metrics endpoint binds (loopback unless an address is given).
    #[arg(long, env = "SWITCHYARD_WORKER_METRICS_LISTEN", default_value = "127.0.0.1:9091")]
    pub metrics_listen: SocketAddr,

    /// Endpoint the coordinator and clients dial, e.g. `http://worker-0.workers:50061`.
    /// Default: `http://LISTEN_ADDRESS:BOUND_PORT`, with 127.0.0.1 for an unspecified address.
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

    /// The dtype expert weights are resident in and computed in: bf16, f16 or f32. Default: the
    /// checkpoint's own dtype (a bf16 checkpoint stays bf16, with no f32 copy); synthetic models
    /// use bf16 on CUDA and f32 on CPU. Independent of the wire dtype clients send.
    #[arg(long, env = "SWITCHYARD_DTYPE")]
    pub dtype: Option<WeightDtype>,

    /// libtorch intra-op threads. Give each process its share of the cores: with two processes on
    /// two cores, 2 threads each can be 5-10x slower than 1.
    #[arg(long, env = "SWITCHYARD_TORCH_THREADS", default_value_t = 1)]
    pub torch_threads: u32,

    /// How long the oldest queued rows of an expert may wait for rows of other requests to merge
    /// with, while other requests are on their way in (a request counts from its headers to its
    /// admission). With none on the way a step starts at once: a lone caller never waits.
    #[arg(long, env = "SWITCHYARD_BATCH_WAIT_US", default_value_t = 100)]
    pub batch_wait_us: u64,

    /// Most rows one merged expert forward takes.
    #[arg(long, env = "SWITCHYARD_MAX_BATCH_TOKENS", default_value_t = 8192)]
    pub max_batch_tokens: usize,

    /// Queue limit per expert, in tokens, for experts loaded without one (the coordinator sends the
    /// model's expert capacity with each assignment).
    #[arg(long, env = "SWITCHYARD_QUEUE_LIMIT_TOKENS", default_value_t = 4096)]
    pub queue_limit_tokens: usize,

    /// Directory every checkpoint named by LoadExperts must lie under, symlinks followed. Without
    /// it the worker serves synthetic models only and refuses every checkpoint path: the path
    /// comes from the network.
    #[arg(long, env = "SWITCHYARD_MODEL_ROOT")]
    pub model_root: Option<std::path::PathBuf>,

    /// Request bytes received at once across every connection: past it, reading waits (HTTP/2
    /// flow control holds the senders), and a single larger request is refused. Clients split
    /// their requests at 15 MiB.
    #[arg(long, env = "SWITCHYARD_WORKER_MAX_RECEIVING_BYTES", default_value_t = 1 << 30)]
    pub max_receiving_bytes: u64,

    /// This worker's matrix-multiply rate in GFLOP/s, which the coordinator places load in
    /// proportion to (a worker twice as fast is given twice the expected traffic); 0: measured
    /// at start in the experts' dtype (~0.2 s on a CPU, timed by the CPU time it took, so a
    /// machine busy at the time does not read as a slow one; a CPU quota below --torch-threads
    /// cores, such as a Kubernetes limit, is not seen: set the rate here then).
    #[arg(long, env = "SWITCHYARD_WORKER_COMPUTE_GFLOPS", default_value_t = 0.0, value_parser = parse_rate)]
    pub compute_gflops: f64,

    /// Memory offered to expert weights, in bytes. 0: on a GPU, nine tenths of what the driver
    /// reports free on it at start (the rest is for activations and the caching allocator); on a
    /// CPU, MemAvailable from /proc/meminfo.
    #[arg(long, env = "SWITCHYARD_WORKER_MEMORY_BYTES", default_value_t = 0)]
    pub memory_bytes: u64,

    /// On SIGTERM, how long (milliseconds) to wait for the coordinator to move this worker's
    /// experts to others before stopping anyway; keep it under Kubernetes' termination grace.
    #[arg(long, env = "SWITCHYARD_DRAIN_TIMEOUT_MS", default_value_t = 20_000)]
    pub drain_timeout_ms: u64,

    /// Once no route names this worker, how long (milliseconds) it keeps serving calls that were
    /// planned on an earlier table, before it stops taking new ones.
    #[arg(long, env = "SWITCHYARD_DRAIN_SETTLE_MS", default_value_t = 500)]
    pub drain_settle_ms: u64,

    /// Freed heap memory that stays resident and unused this long (milliseconds), once more of it
    /// sat unused than the interval's calls reused, is given back to the system (glibc's
    /// malloc_trim): without it a worker under overload grows by a third in swings, holding memory
    /// its steps freed; memory reused within the interval (the next call's buffers) stays. 0:
    /// never (the worker sets glibc to keep freed memory, so its RSS then keeps its peak, unless
    /// MALLOC_* or GLIBC_TUNABLES set the allocator).
    #[arg(long, env = "SWITCHYARD_HEAP_TRIM_INTERVAL_MS", default_value_t = 1000)]
    pub heap_trim_interval_ms: u64,

    /// Serve identity experts (each answers with its input, no compute, no weights) to measure
    /// dispatch and combine alone, as DeepEP's benchmarks do.
    #[arg(long, env = "SWITCHYARD_IDENTITY_EXPERTS")]
    pub identity_experts: bool,

    /// With --identity-experts: each step keeps the compute thread busy this long (microseconds;
    /// spinning, touching no memory), standing in for expert compute without its memory traffic.
    /// It shows what a step's length costs the rest of a call (threads and cores that idle
    /// through it and must be woken after) apart from what computing costs.
    #[arg(long, env = "SWITCHYARD_IDENTITY_HOLD_US", default_value_t = 0, requires = "identity_experts")]
    pub identity_hold_us: u64,

    /// Keep each layer's experts of one shape (form, sizes, dtype, biases or none) in stacked weight
    /// tensors and compute all of a step's experts of a stack in one grouped product per matrix
    /// (torch's `_grouped_mm`: one CUTLASS kernel over the experts), instead of one product per
    /// expert. Outputs are the same. It applies to bf16 experts on GPUs of compute capability 9.x
    /// or 10.x (Hopper, Blackwell); f32 or f16 experts and other GPUs compute one by one anyway
    /// (torch's fallback would wait for the device), and on a CPU libtorch loops over the experts
    /// itself (no measurable gain). Restacking a layer on a load or an unload briefly holds one of its
    /// matrices twice (the input projection: two thirds of a SwiGLU layer's weights).
    #[arg(long, env = "SWITCHYARD_GROUPED_EXPERTS")]
    pub grouped_experts: bool,

    /// Also export per-expert Prometheus series (admitted and refused tokens per layer and expert).
    /// Off by default: a large model makes thousands of series.
    #[arg(long, env = "SWITCHYARD_PER_EXPERT_METRICS")]
    pub per_expert_metrics: bool,

    #[command(flatten)]
    pub tls: switchyard_common::tls::TlsArgs,

    #[command(flatten)]
    pub tracing: TracingArgs,

    /// Check the flags and environment, print the configuration they make and exit without
    /// binding a port or loading libtorch's device (used by the Helm chart's tests).
    #[arg(long, env = "SWITCHYARD_CHECK_CONFIG")]
    pub check_config: bool,
}

impl Args {
    /// Checks what clap cannot: endpoints are http(s) URIs with a host, sizes are positive. The
    /// error names the flag.
    pub fn check(&self) -> Result<(), ConfigError> {
        for (flag, uri) in [("--advertise", &self.advertise), ("--coordinator", &self.coordinator)] {
            if let Some(uri) = uri {
                check_endpoint(uri).map_err(|reason| ConfigError::Endpoint {
                    flag,
                    uri: uri.clone(),
                    reason: reason.to_owned(),
                })?;
            }
        }
        for (flag, value) in [
            ("--torch-threads", self.torch_threads as usize),
            ("--max-batch-tokens", self.max_batch_tokens),
            ("--queue-limit-tokens", self.queue_limit_tokens),
            ("--max-receiving-bytes", usize::try_from(self.max_receiving_bytes).unwrap_or(usize::MAX)),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { flag });
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

    /// `--memory-bytes`, else what the device has (see the flag).
    pub fn offered_memory_bytes(&self, device: tch::Device) -> u64 {
        if self.memory_bytes > 0 {
            return self.memory_bytes;
        }
        if let tch::Device::Cuda(index) = device {
            match switchyard_experts::device::gpu_free_memory(index) {
                Ok(free) => return free / 10 * 9,
                Err(error) => {
                    tracing::warn!(%error, "GPU memory unknown: offering host memory instead (set --memory-bytes)")
                }
            }
        }
        available_memory_bytes().unwrap_or(8 << 30)
    }
}

/// A finite, non-negative rate.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err(format!("{text:?} is not a finite number of GFLOP/s (0: measure)")),
    }
}

/// Flags that make no worker; the message names the flag.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{flag} {uri}: {reason}")]
    Endpoint { flag: &'static str, uri: String, reason: String },
    #[error("{flag} must be at least 1")]
    Zero { flag: &'static str },
}

/// Why `uri` is not a worker or coordinator endpoint, if it is not.
fn check_endpoint(uri: &str) -> Result<(), &'static str> {
    let parsed: tonic::transport::Uri = uri.parse().map_err(|_| "not a URI")?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) {
        return Err("the scheme must be http or https");
    }
    if parsed.host().is_none_or(str::is_empty) {
        return Err("a host is missing");
    }
    Ok(())
}

/// What this process may use: the node's available memory, capped by the container's memory limit
/// (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`). In a pod `/proc/meminfo` shows the
/// whole node, and a worker that offered that would be given experts until the kernel killed it.
fn available_memory_bytes() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let node = read("/proc/meminfo").and_then(|meminfo| mem_available(&meminfo));
    let limit = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|text| cgroup_limit(&text));
    smaller_known(node, limit)
}

/// The smaller of the node's available memory and the container's limit, whichever are known.
fn smaller_known(node: Option<u64>, limit: Option<u64>) -> Option<u64> {
    match (node, limit) {
        (Some(node), Some(limit)) => Some(node.min(limit)),
        (node, limit) => node.or(limit),
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    meminfo_bytes(meminfo, "MemAvailable:")
}

/// The `/proc/meminfo` line `field` (with its colon), in bytes.
fn meminfo_bytes(meminfo: &str, field: &str) -> Option<u64> {
    let line = meminfo.lines().find(|line| line.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A cgroup memory limit in bytes; `None` for "max" (v2) or v1's page-rounded "no limit" value.
fn cgroup_limit(text: &str) -> Option<u64> {
    const V1_UNLIMITED: u64 = 1 << 62;
    text.trim().parse::<u64>().ok().filter(|limit| *limit < V1_UNLIMITED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn every_flag_has_an_environment_fallback() {
        let missing = switchyard_common::flags::without_env(&<Args as clap::CommandFactory>::command());
        assert!(missing.is_empty(), "flags without an env fallback: {missing:#?}");
    }

    #[test]
    fn defaults_parse_and_the_endpoint_follows_the_bound_port() {
        let args = Args::try_parse_from(["switchyard-worker"]).expect("defaults are valid");
        let bound: SocketAddr = "0.0.0.0:43210".parse().expect("address");
        assert_eq!(args.advertised_endpoint(bound), "http://127.0.0.1:43210");
        assert!(args.offered_memory_bytes(tch::Device::Cpu) > 0);
        let args = Args::try_parse_from(["switchyard-worker", "--advertise", "http://w-0:1", "--device", "cpu"])
            .expect("valid");
        assert_eq!(args.advertised_endpoint(bound), "http://w-0:1");
        assert!(Args::try_parse_from(["switchyard-worker", "--device", "tpu"]).is_err());
        assert_eq!(args.dtype, None);
        let args = Args::try_parse_from(["switchyard-worker", "--dtype", "bf16"]).expect("valid");
        assert_eq!(args.dtype, Some(WeightDtype::Bf16));
        let error = Args::try_parse_from(["switchyard-worker", "--dtype", "fp8"]).expect_err("unknown dtype");
        assert!(error.to_string().contains("unknown dtype 'fp8'"), "{error}");
        let flags =
            ["switchyard-worker", "--batch-wait-us", "250", "--memory-bytes", "4096", "--compute-gflops", "1.5"];
        let args = Args::try_parse_from(flags).expect("valid");
        assert_eq!(args.batch_wait(), Duration::from_micros(250));
        assert_eq!(args.offered_memory_bytes(tch::Device::Cpu), 4096, "--memory-bytes, not the machine's");
        assert_eq!(args.compute_gflops, 1.5);
        for rate in ["-1", "inf", "NaN", "fast"] {
            let flag = format!("--compute-gflops={rate}");
            let error = Args::try_parse_from(["switchyard-worker", flag.as_str()]).expect_err("not a rate");
            assert!(error.to_string().contains(&format!("{rate:?} is not a finite number of GFLOP/s")), "{error}");
        }
    }

    #[test]
    fn checks_name_the_flag() {
        let args = Args::try_parse_from(["switchyard-worker", "--coordinator", "ftp://coordinator"]).expect("parses");
        assert_eq!(
            args.check(),
            Err(ConfigError::Endpoint {
                flag: "--coordinator",
                uri: "ftp://coordinator".into(),
                reason: "the scheme must be http or https".into()
            })
        );
        let args = Args::try_parse_from(["switchyard-worker", "--max-batch-tokens", "0"]).expect("parses");
        assert_eq!(args.check().unwrap_err().to_string(), "--max-batch-tokens must be at least 1");
        let args = Args::try_parse_from(["switchyard-worker", "--max-receiving-bytes", "0"]).expect("parses");
        assert_eq!(args.check().unwrap_err().to_string(), "--max-receiving-bytes must be at least 1");
    }

    #[test]
    fn a_step_hold_is_for_identity_experts_only() {
        let error = Args::try_parse_from(["switchyard-worker", "--identity-hold-us", "2000"]).expect_err("no identity");
        assert_eq!(error.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(error.to_string().contains("--identity-experts"), "{error}");
        let args = Args::try_parse_from(["switchyard-worker", "--identity-experts", "--identity-hold-us", "2000"])
            .expect("with identity experts");
        assert_eq!(args.identity_hold_us, 2000);
    }

    #[test]
    fn memory_is_the_smaller_of_the_nodes_available_and_the_containers_limit() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(mem_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(cgroup_limit("8589934592\n"), Some(8 << 30), "a v2 or v1 limit");
        assert_eq!(cgroup_limit("max\n"), None, "v2 without a limit");
        assert_eq!(cgroup_limit("9223372036854771712\n"), None, "v1 without a limit");
        assert_eq!(smaller_known(Some(20 << 30), Some(8 << 30)), Some(8 << 30), "the container's limit");
        assert_eq!(smaller_known(Some(4 << 30), Some(8 << 30)), Some(4 << 30), "the node's available memory");
        assert_eq!(smaller_known(Some(4 << 30), None), Some(4 << 30));
        assert_eq!(smaller_known(None, Some(8 << 30)), Some(8 << 30));
        assert_eq!(smaller_known(None, None), None);
        // Against this machine: MemAvailable moves while sibling tests allocate, MemTotal does not.
        let offered =
            Args::try_parse_from(["switchyard-worker"]).expect("defaults").offered_memory_bytes(tch::Device::Cpu);
        let node = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| meminfo_bytes(&m, "MemTotal:"));
        assert!(node.is_none_or(|node| offered <= node), "never more than the node has");
    }
}
