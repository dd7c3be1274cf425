//! Tracing for every binary: logs on stderr, filtered by `RUST_LOG` (default `info`), and the same
//! spans exported over OTLP when a collector is named ([`crate::otlp`]).

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

/// Installs the global subscriber: `args`' log format, and OTLP export when it names a collector
/// (`service_name` names this process there). Call once, first thing in `main`, within the Tokio
/// runtime; keep the guard until the end.
pub fn init_tracing(args: &TracingArgs, service_name: &'static str) -> Result<TracingGuard, OtlpError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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
