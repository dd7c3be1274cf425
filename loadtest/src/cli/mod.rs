//! The `switchyard` command line: flags here, work in the libraries. Compiled into `switchyard`
//! (this package) and `switchyard-torch` (switchyard-tools), each with its own `crate::libtorch`.

mod certs;
mod coordinator;
mod forward;
pub(crate) mod load_args;
pub(crate) mod loadtest;
pub(crate) mod local;
mod model_info;
mod status;
pub(crate) mod values;

use switchyard_common::tracing_setup::TracingArgs;

/// Switchyard: a distributed expert-parallel runtime for Mixture-of-Experts layers.
///
/// Start a local cluster (`switchyard local --loadtest` runs a short load test on it and prints the
/// report), load-test a running cluster, or show what the coordinator placed where.
#[derive(Debug, clap::Parser)]
#[command(name = "switchyard", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    #[command(flatten)]
    pub tracing: TracingArgs,

    /// libtorch intra-op threads of this process (the reference layer's experts).
    #[arg(long, global = true, env = "SWITCHYARD_TORCH_THREADS", default_value_t = 1, value_parser = values::parse_count::<u32>)]
    pub torch_threads: u32,

    /// The identity this process presents to a cluster that runs mutual TLS (a client-role
    /// certificate for `loadtest`, `status`, `forward`).
    #[command(flatten)]
    pub tls: switchyard_common::tls::TlsArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Start a coordinator and N expert workers on 127.0.0.1; stop them all on Ctrl-C or exit.
    Local(local::LocalArgs),
    /// Drive a running cluster (or the in-process reference layer) with concurrent callers.
    Loadtest(loadtest::LoadtestArgs),
    /// Show the coordinator's workers, placement and routing table version.
    Status(status::StatusArgs),
    /// Run `hidden_states` from a safetensors file through one layer of a running cluster; write
    /// `out` and `router_logits`, print the router statistics.
    Forward(forward::ForwardArgs),
    /// Measure what expert parallelism costs: a sweep over cluster shapes, tokens per call and wire
    /// dtypes (each point also run in-process), DeepEP's dispatch/combine settings, and a report
    /// folder with Markdown, JSON and SVG charts.
    ///
    /// Lists are comma-separated. The first value of each cluster axis (--workers, --experts,
    /// --top-k, --dims) is the base; each axis varies alone around it (--grid: every combination),
    /// each shape on a fresh local cluster, and every cluster runs every --tokens x --wire-dtypes
    /// point, distributed and through the in-process reference layer with as many libtorch threads
    /// as its workers have together, taking turns with a raw TCP echo and a plain gRPC echo of one
    /// request's bytes (the network phase's floor, and what tonic and h2 alone cost). The DeepEP
    /// presets (--run deepep) use identity experts and bf16 both ways and measure, in the same run,
    /// raw TCP and a plain gRPC echo of the same bytes, and raw TCP to every worker at once (the
    /// dispatch's fan-out with the TCP stack alone), round after round and again right after every
    /// core was kept busy as long as the calls' gate (the state a dispatch finds the machine in).
    Bench(crate::libtorch::BenchArgs),
    /// Layers, experts, total and active parameters per token of a checkpoint or synthetic model.
    ModelInfo(model_info::ModelInfoArgs),
    /// Check that the device (a GPU, or the CPU) computes what the CPU computes: the workers' own
    /// compute path in f32, f16 and bf16 against f32 on the CPU and, with --fixtures, every
    /// checkpoint fixture against transformers' outputs; and measure its bf16 and f32 matmul peak.
    /// Exits non-zero when a check fails.
    DeviceCheck(crate::libtorch::DeviceCheckArgs),
    /// Write a development CA and a certificate per role (coordinator, worker, client) for mutual
    /// TLS; each names its role in a `spiffe://switchyard/ROLE` URI. For production, issue the
    /// same from your own CA (cert-manager, Vault).
    Certs(certs::CertsArgs),
}

/// Runs the command. Those that compute with libtorch in this process go to [`crate::libtorch`]:
/// in `switchyard`, which links no libtorch and so starts in milliseconds, that hands them to
/// `switchyard-torch`; in `switchyard-torch` it runs them.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    present_tls_identity(&cli)?;
    match &cli.command {
        Command::Local(args) => args.load.check_report_paths()?,
        Command::Loadtest(args) if !args.check_config => args.load.check_report_paths()?,
        _ => {}
    }
    match cli.command {
        Command::Local(args) if args.compare_reference => crate::libtorch::local_compared(args, &cli.tracing).await,
        Command::Local(args) => local::run(args, &cli.tracing).await,
        Command::Loadtest(args) if args.reference && !args.check_config => {
            crate::libtorch::loadtest_reference(args, cli.torch_threads).await
        }
        Command::Loadtest(args) => loadtest::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Forward(args) => forward::run(args).await,
        Command::ModelInfo(args) => model_info::run(args),
        Command::Bench(args) => crate::libtorch::bench(args).await,
        Command::DeviceCheck(args) => crate::libtorch::device_check(args).await,
        Command::Certs(args) => certs::run(args),
    }
}

/// Loads the `--tls-*` identity this process presents on its outgoing connections.
fn present_tls_identity(cli: &Cli) -> anyhow::Result<()> {
    // `loadtest --check-config` only checks the flags: the certificates' files need not be there.
    let checking = matches!(&cli.command, Command::Loadtest(loadtest) if loadtest.check_config);
    if let Some(files) = cli.tls.files().filter(|_| !checking) {
        if matches!(&cli.command, Command::Local(local) if local.tls) {
            anyhow::bail!(
                "switchyard local --tls makes its own certificates; --tls-cert, --tls-key and --tls-ca are not for it"
            );
        }
        if matches!(&cli.command, Command::Bench(_)) {
            anyhow::bail!(
                "switchyard bench runs clusters of its own: --tls gives them (and it) certificates from a development CA; --tls-cert, --tls-key and --tls-ca are not for it"
            );
        }
        switchyard_common::tls::use_for_outgoing(switchyard_common::tls::ClientTls::load(files)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// `scripts/run.sh` passes defaults before the caller's own flags; the caller's win.
    #[test]
    fn a_later_local_flag_overrides_the_default_given_before_it() {
        let cli =
            Cli::try_parse_from(["switchyard", "local", "--duration", "10s", "--tokens", "64", "--duration", "20s"])
                .expect("a repeated flag is accepted");
        let Command::Local(args) = cli.command else { panic!("the local command") };
        assert_eq!(args.load.duration, std::time::Duration::from_secs(20));
        assert_eq!(args.load.tokens, 64);
    }

    #[test]
    fn every_flag_has_an_environment_fallback() {
        let missing = switchyard_common::flags::without_env(&<Cli as clap::CommandFactory>::command());
        assert!(missing.is_empty(), "flags without an env fallback: {missing:#?}");
    }

    #[test]
    fn report_files_that_could_not_be_written_are_refused_before_the_run() {
        let dir = std::env::temp_dir().join(format!("switchyard-report-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a folder");
        let parse = |flag: &str, path: &std::path::Path| {
            let cli = Cli::try_parse_from(["switchyard", "local", flag, &path.display().to_string()]).expect("parses");
            let Command::Local(args) = cli.command else { panic!("the local command") };
            args.load
        };
        let missing_folder = dir.join("missing").join("out.json");
        let error = parse("--json", &missing_folder).check_report_paths().expect_err("no such folder");
        assert!(error.to_string().contains(&format!("{} could not be written", missing_folder.display())), "{error}");
        let fresh = dir.join("out.csv");
        parse("--csv", &fresh).check_report_paths().expect("a file can be made there");
        assert!(!fresh.exists(), "the check leaves no file behind");
        std::fs::write(&fresh, "kept").expect("written");
        parse("--csv", &fresh).check_report_paths().expect("an existing file is writable");
        assert_eq!(std::fs::read_to_string(&fresh).expect("read"), "kept", "and is left as it was");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_local_cluster_without_workers_is_refused_before_anything_starts() {
        let error = Cli::try_parse_from(["switchyard", "local", "--workers", "0"]).expect_err("no worker");
        assert!(error.to_string().contains("'0' for '--workers <WORKERS>'"), "{error}");
        let Command::Local(args) = Cli::try_parse_from(["switchyard", "local", "--workers", "1"]).expect("one").command
        else {
            panic!("the local command")
        };
        assert_eq!(args.workers, 1);
    }
}
