//! Tracing for every binary: logs on stderr, filtered by `RUST_LOG` (by default [`SERVER_LOGS`] or
//! [`COMMAND_LOGS`]), and the same spans exported over OTLP when a collector is named
//! ([`crate::otlp`]).

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::otlp::{OtlpError, OtlpExport};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl LogFormat {
    /// As the `--log-format` flag and `SWITCHYARD_LOG_FORMAT` name it.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The flags every binary takes for its logs and traces.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct TracingArgs {
    /// Log line format (logs go to stderr).
    #[cfg_attr(
        feature = "clap",
        arg(long, global = true, env = "SWITCHYARD_LOG_FORMAT", value_enum, default_value = "text")
    )]
    pub log_format: LogFormat,

    /// Export INFO spans over OTLP/gRPC to this collector (e.g. http://otel-collector:4317); the
    /// trace context travels to the workers in each request's metadata. Off when unset.
    #[cfg_attr(feature = "clap", arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT"))]
    pub otlp_endpoint: Option<String>,
}

impl Default for TracingArgs {
    fn default() -> Self {
        Self { log_format: LogFormat::Text, otlp_endpoint: None }
    }
}

impl TracingArgs {
    /// The environment a child process reads these flags from.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let format = ("SWITCHYARD_LOG_FORMAT".to_owned(), self.log_format.name().to_owned());
        let endpoint =
            self.otlp_endpoint.iter().map(|endpoint| ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), endpoint.clone()));
        std::iter::once(format).chain(endpoint).collect()
    }
}

/// Keeps the span exporter alive; dropping it sends the spans not yet exported.
#[must_use = "dropping the guard stops the span export"]
#[derive(Debug, Default)]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("spans not exported at exit: {error}");
        }
    }
}

/// What a server (coordinator, worker) logs unless `RUST_LOG` says otherwise.
pub const SERVER_LOGS: &str = "info";

/// What a command (`switchyard`, `switchyard-torch`) logs unless `RUST_LOG` says otherwise: its
/// output is its report, so the worker code it may run in-process (the reference layer) says only
/// what goes wrong, not each step a worker process logs for its operator.
pub const COMMAND_LOGS: &str = "info,switchyard_expert_worker=warn";

/// Installs the global subscriber: `args`' log format, `default_filter` unless `RUST_LOG` is set,
/// and OTLP export when `args` names a collector (`service_name` names this process there). Call
/// once, first thing in `main`, within the Tokio runtime; keep the guard until the end.
pub fn init_tracing(
    args: &TracingArgs,
    service_name: &'static str,
    default_filter: &str,
) -> Result<TracingGuard, OtlpError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match args.log_format {
        LogFormat::Text => logs.with_target(false).boxed(),
        LogFormat::Json => logs.json().with_current_span(true).boxed(),
    };
    let provider = args
        .otlp_endpoint
        .as_ref()
        .map(|endpoint| crate::otlp::tracer_provider(&OtlpExport { endpoint: endpoint.clone(), service_name }))
        .transpose()?;
    let spans = provider.as_ref().map(crate::otlp::layer);
    tracing_subscriber::registry().with(filter).with(logs).with(spans).init();
    Ok(TracingGuard { provider })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log lines written, shared with the subscriber that writes them.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lines").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What one event of each target leaves under `filter`.
    fn logged_under(filter: &str) -> String {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(filter))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "switchyard_expert_worker::worker", "experts loaded");
            tracing::warn!(target: "switchyard_expert_worker::worker", "a load failed");
            tracing::info!(target: "switchyard_loadtest::cli", "a command's own line");
        });
        String::from_utf8(lines.0.lock().expect("lines").clone()).expect("UTF-8")
    }

    #[test]
    fn a_commands_report_is_not_interleaved_with_the_steps_of_the_worker_code_it_runs() {
        let command = logged_under(COMMAND_LOGS);
        assert!(!command.contains("experts loaded"), "{command}");
        assert!(command.contains("a load failed") && command.contains("a command's own line"), "{command}");
        let server = logged_under(SERVER_LOGS);
        assert!(server.contains("experts loaded"), "a worker process says it to its operator: {server}");
    }

    #[test]
    fn children_are_told_this_process_s_log_format_and_collector() {
        let pair = |name: &str, value: &str| (name.to_owned(), value.to_owned());
        assert_eq!(TracingArgs::default().child_env(), [pair("SWITCHYARD_LOG_FORMAT", "text")]);
        let exporting =
            TracingArgs { log_format: LogFormat::Json, otlp_endpoint: Some("http://collector:4317".into()) };
        assert_eq!(
            exporting.child_env(),
            [pair("SWITCHYARD_LOG_FORMAT", "json"), pair("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")]
        );
    }

    #[cfg(feature = "clap")]
    #[test]
    fn each_format_s_name_is_the_one_its_flag_takes() {
        use clap::ValueEnum;
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(LogFormat::from_str(format.name(), false), Ok(format));
        }
    }
}
