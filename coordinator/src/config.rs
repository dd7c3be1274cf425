//! Command-line flags (each with an environment fallback) and the cluster configuration built from them.

use std::net::SocketAddr;
use std::time::Duration;

use switchyard_common::tracing_setup::TracingArgs;
use switchyard_model::cli::{ModelArgs, ModelArgsError};

use switchyard_model::{CapacityPolicy, ModelSpec};

use crate::cluster::{Balancing, ClusterConfig};

/// The Switchyard coordinator: accepts expert workers, places the experts of a model across them,
/// and publishes a versioned routing table that clients watch. It is off the data path: clients
/// keep working on their last table while it restarts.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "switchyard-coordinator", version)]
pub struct Args {
    /// Address the gRPC server binds (port 0 picks a free port; see the SWITCHYARD_READY line).
    /// Loopback unless an address is given: other hosts reach it only when asked (`0.0.0.0:…`).
    #[arg(long, env = "SWITCHYARD_COORDINATOR_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Address the Prometheus /metrics endpoint binds (loopback unless an address is given).
    #[arg(long, env = "SWITCHYARD_COORDINATOR_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub tls: switchyard_common::tls::TlsArgs,

    /// Largest batch (tokens per layer call) a client sends; each expert queue admits that batch's
    /// expert capacity, ceil(top_k * tokens / experts * capacity_factor), across all clients, or the
    /// whole batch when the model is dropless or has a per-sequence expert capacity.
    #[arg(long, env = "SWITCHYARD_MAX_BATCH_TOKENS", default_value_t = 8192,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=u64::from(u32::MAX)))]
    pub max_batch_tokens: usize,

    /// Workers to wait for before placing experts the first time.
    #[arg(long, env = "SWITCHYARD_MIN_WORKERS", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub min_workers: usize,

    /// Most workers registered at once: a registration beyond them is refused (RESOURCE_EXHAUSTED)
    /// until one leaves, so a misconfigured autoscaler or a peer registering without end cannot
    /// grow the coordinator's state, its reconcile rounds and every client's routing table.
    #[arg(long, env = "SWITCHYARD_MAX_WORKERS", default_value_t = 1024,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_workers: usize,

    /// Workers holding each expert. With 2 or more, clients spread calls over the holders and retry
    /// on another when one fails, so losing a worker costs no call.
    #[arg(long, env = "SWITCHYARD_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub replicas: u16,

    /// Replicas of particular experts instead of --replicas, as EXPERT=COUNT pairs (e.g. 0=3,5=2 for
    /// experts 0 and 5 of every MoE layer): known hot experts, or a shared expert every token uses.
    #[arg(long, env = "SWITCHYARD_EXPERT_REPLICAS", value_delimiter = ',', value_parser = parse_expert_replicas)]
    pub expert_replicas: Vec<(u32, usize)>,

    /// Balance placement by measured traffic (EPLB) every this many milliseconds: hot experts get
    /// the redundant replicas and each worker's share of the traffic is evened out, moving experts
    /// make-before-break. 0: balance by expert size only.
    #[arg(long, env = "SWITCHYARD_REBALANCE_INTERVAL_MS", default_value_t = 0)]
    pub rebalance_interval_ms: u64,

    /// Replicas beyond --replicas that load balancing may add, each to the expert with the most
    /// traffic per replica.
    #[arg(long, env = "SWITCHYARD_REDUNDANT_REPLICAS", default_value_t = 0)]
    pub redundant_replicas: usize,

    /// How often workers heartbeat, in milliseconds (at least 50).
    #[arg(long, env = "SWITCHYARD_HEARTBEAT_INTERVAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..))]
    pub heartbeat_interval_ms: u64,

    /// A worker silent this long (milliseconds) is removed and its experts placed on the survivors.
    #[arg(long, env = "SWITCHYARD_HEARTBEAT_TIMEOUT_MS", default_value_t = 3000)]
    pub heartbeat_timeout_ms: u64,

    /// How long (milliseconds) a worker keeps an expert after the table moved it elsewhere.
    #[arg(long, env = "SWITCHYARD_UNLOAD_GRACE_MS", default_value_t = 5000)]
    pub unload_grace_ms: u64,

    #[command(flatten)]
    pub tracing: TracingArgs,

    /// Check the flags and environment, print the configuration they make and exit without
    /// binding a port (used by the Helm chart's tests; exit status 2 names a bad flag).
    #[arg(long, env = "SWITCHYARD_CHECK_CONFIG")]
    pub check_config: bool,
}

/// `EXPERT=COUNT`, a count of at least 1.
fn parse_expert_replicas(pair: &str) -> Result<(u32, usize), String> {
    let (expert, count) = pair.split_once('=').ok_or_else(|| format!("'{pair}' is not EXPERT=COUNT"))?;
    let expert = expert.trim().parse().map_err(|_| format!("'{expert}' is not an expert index"))?;
    match count.trim().parse() {
        Ok(count) if count >= 1 => Ok((expert, count)),
        _ => Err(format!("'{count}' is not a replica count of at least 1")),
    }
}

/// Flags that make no cluster; the message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Model(#[from] ModelArgsError),
    #[error("--heartbeat-timeout-ms ({timeout}) must exceed --heartbeat-interval-ms ({interval})")]
    HeartbeatTimeout { timeout: u64, interval: u64 },
    #[error("--max-workers ({max}) must be at least --min-workers ({min}): the first placement would never come")]
    MaxWorkers { max: usize, min: usize },
    #[error("--expert-replicas names expert {expert}, but the model's layers have {}", numbering(*routed, *shared))]
    NoSuchExpert { expert: u32, routed: u32, shared: u32 },
}

/// How a layer's experts are numbered: the routed ones first, then the shared ones.
fn numbering(routed: u32, shared: u32) -> String {
    let span = |first: u32, count: u32| match count {
        1 => format!("{first}"),
        _ => format!("{first} to {}", first + count - 1),
    };
    match shared {
        0 => format!("{routed} experts ({})", span(0, routed)),
        _ => format!("{routed} routed experts ({}) and {shared} shared ({})", span(0, routed), span(routed, shared)),
    }
}

impl TryFrom<&Args> for ClusterConfig {
    type Error = ConfigError;

    fn try_from(args: &Args) -> Result<Self, Self::Error> {
        let model = args.model.spec()?;
        if args.heartbeat_timeout_ms <= args.heartbeat_interval_ms {
            return Err(ConfigError::HeartbeatTimeout {
                timeout: args.heartbeat_timeout_ms,
                interval: args.heartbeat_interval_ms,
            });
        }
        if args.max_workers < args.min_workers {
            return Err(ConfigError::MaxWorkers { max: args.max_workers, min: args.min_workers });
        }
        let (routed, shared) = (model.experts_per_layer, model.shared_experts);
        if let Some((expert, _)) = args.expert_replicas.iter().find(|(expert, _)| *expert >= routed + shared) {
            return Err(ConfigError::NoSuchExpert { expert: *expert, routed, shared });
        }
        Ok(ClusterConfig {
            queue_limit_tokens: queue_limit(&model, args.max_batch_tokens),
            model,
            heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
            heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms),
            min_workers: args.min_workers,
            max_workers: args.max_workers,
            max_batch_tokens: args.max_batch_tokens as u32,
            unload_grace: Duration::from_millis(args.unload_grace_ms),
            replicas: usize::from(args.replicas),
            expert_replicas: args.expert_replicas.iter().copied().collect(),
            balancing: (args.rebalance_interval_ms > 0).then(|| Balancing {
                interval: Duration::from_millis(args.rebalance_interval_ms),
                redundant: args.redundant_replicas,
            }),
        })
    }
}

/// Tokens a routed expert's queue admits across all clients. With a capacity factor it is the
/// capacity of the largest batch. A dropless model must admit every row a batch may send one expert,
/// which is the whole batch; with a per-sequence capacity the client enforces it per call and the
/// queue bounds the worker at the largest batch too.
fn queue_limit(model: &ModelSpec, max_batch_tokens: usize) -> u32 {
    let limit = match model.capacity {
        CapacityPolicy::Factor(_) => model.capacity(max_batch_tokens).unwrap_or(max_batch_tokens),
        CapacityPolicy::Dropless | CapacityPolicy::PerSequence(_) => max_batch_tokens,
    };
    limit.clamp(1, u32::MAX as usize) as u32
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

    /// Plaintext must be asked for: neither certificates nor --insecure is an error naming both,
    /// and the two together do not parse.
    #[test]
    fn serving_needs_certificates_or_an_explicit_insecure() {
        let parse = |extra: &[&str]| Args::try_parse_from(["switchyard-coordinator"].iter().chain(extra));
        let error = parse(&[]).expect("parses").tls.server_mode().unwrap_err().to_string();
        assert!(error.contains("--tls-cert") && error.contains("--insecure"), "{error}");
        assert_eq!(parse(&["--insecure"]).expect("parses").tls.server_mode().expect("plaintext"), None);
        let tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem"];
        let files = parse(&tls).expect("parses").tls.server_mode().expect("TLS").expect("files");
        assert_eq!(files.ca, std::path::PathBuf::from("ca.pem"));
        assert!(parse(&[&tls[..], &["--insecure"]].concat()).is_err(), "both at once");
        assert!(parse(&["--tls-cert", "c.pem"]).is_err(), "a certificate without its key and CA");
    }

    #[test]
    fn defaults_give_the_default_synthetic_model_and_its_capacity() {
        let args = Args::try_parse_from(["switchyard-coordinator"]).expect("defaults parse");
        let config = ClusterConfig::try_from(&args).expect("defaults are valid");
        assert_eq!(config.model, ModelSpec::default_synthetic());
        assert_eq!(config.queue_limit_tokens, 2560, "ceil(2 * 8192 / 8 * 1.25)");
        assert_eq!(config.max_batch_tokens, 8192);
    }

    #[test]
    fn a_dropless_model_admits_the_largest_batch_into_every_queue() {
        let args = Args::try_parse_from(["switchyard-coordinator", "--dropless", "--max-batch-tokens", "512"])
            .expect("parses");
        let config = ClusterConfig::try_from(&args).expect("valid");
        assert_eq!(config.model.capacity, CapacityPolicy::Dropless);
        assert_eq!((config.queue_limit_tokens, config.max_batch_tokens), (512, 512));
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        let args = Args::try_parse_from(["switchyard-coordinator", "--top-k", "9"]).expect("parses");
        assert!(ClusterConfig::try_from(&args).unwrap_err().to_string().contains("model.top_k"));
        let args = Args::try_parse_from(["switchyard-coordinator", "--heartbeat-timeout-ms", "100"]).expect("parses");
        assert!(ClusterConfig::try_from(&args).unwrap_err().to_string().contains("--heartbeat-timeout-ms"));
        assert!(Args::try_parse_from(["switchyard-coordinator", "--activation", "tanh"]).is_err());
        let args = Args::try_parse_from(["switchyard-coordinator", "--min-workers", "4", "--max-workers", "3"])
            .expect("parses");
        let error = ClusterConfig::try_from(&args).unwrap_err().to_string();
        assert!(error.starts_with("--max-workers (3) must be at least --min-workers (4)"), "{error}");
        for (flag, value) in [
            ("--max-batch-tokens", "0"),
            ("--min-workers", "0"),
            ("--max-workers", "0"),
            ("--heartbeat-interval-ms", "49"),
        ] {
            let error = Args::try_parse_from(["switchyard-coordinator", flag, value]).expect_err("out of range");
            assert!(error.to_string().contains(&format!("'{value}' for '{flag}")), "{error}");
        }
        let error = Args::try_parse_from(["switchyard-coordinator", "--expert-replicas", "0=0"]).unwrap_err();
        assert!(error.to_string().contains("--expert-replicas"), "{error}");
        assert!(error.to_string().contains("at least 1"), "{error}");
        let args = Args::try_parse_from([
            "switchyard-coordinator",
            "--expert-replicas",
            "0=3,5=2",
            "--expert-replicas",
            "6=2",
        ])
        .expect("parses");
        let config = ClusterConfig::try_from(&args).expect("valid");
        assert_eq!(config.expert_replicas, [(0, 3), (5, 2), (6, 2)].into());
        assert_eq!(config.replicas_of(switchyard_model::ExpertId::new(0, 5)), 2);
        let args = Args::try_parse_from(["switchyard-coordinator", "--expert-replicas", "8=2"]).expect("parses");
        let error = ClusterConfig::try_from(&args).unwrap_err().to_string();
        assert_eq!(error, "--expert-replicas names expert 8, but the model's layers have 8 experts (0 to 7)");
        // A shared expert, which every token uses, is numbered after the routed ones.
        let shared = |replicas: &str| {
            let args = ["switchyard-coordinator", "--shared-experts", "1", "--expert-replicas", replicas];
            ClusterConfig::try_from(&Args::try_parse_from(args).expect("parses"))
        };
        assert_eq!(shared("8=2").expect("the shared expert").expert_replicas, [(8, 2)].into());
        let beyond = shared("9=2").unwrap_err().to_string();
        assert!(beyond.ends_with("have 8 routed experts (0 to 7) and 1 shared (8)"), "{beyond}");
        assert_eq!(numbering(64, 2), "64 routed experts (0 to 63) and 2 shared (64 to 65)");
    }

    #[test]
    fn balancing_by_traffic_is_on_only_with_an_interval() {
        let config = |extra: &[&str]| {
            let args = Args::try_parse_from(["switchyard-coordinator"].iter().chain(extra)).expect("parses");
            ClusterConfig::try_from(&args).expect("valid")
        };
        assert!(config(&[]).balancing.is_none(), "by size unless asked");
        let balancing = config(&["--rebalance-interval-ms", "500", "--redundant-replicas", "2"]).balancing;
        let Some(Balancing { interval, redundant }) = balancing else { panic!("balancing is on") };
        assert_eq!((interval, redundant), (Duration::from_millis(500), 2));
    }
}
