//! Process plumbing shared by `switchyard-coordinator`, `switchyard-worker` and `switchyard`:
//!
//! - [`tracing_setup`]: one `init_tracing` for every binary (text or JSON, `RUST_LOG`, OTLP export).
//! - [`otlp`]: span export over OTLP/gRPC and the trace context carried in gRPC metadata.
//! - [`metrics_http`]: the Prometheus `/metrics` endpoint.
//! - [`transport`]: HTTP/2 windows, frame and message size limits, set alike on servers and clients.
//! - [`shutdown`]: Ctrl-C / SIGTERM as a future.
//! - [`backoff`]: the waits before dialling a peer again (exponential, jittered).
//! - [`children`]: child processes that die with their parent, for `switchyard local` and tests.
//! - [`clock`]: Unix-epoch timestamps for times measured across processes.
//! - [`readiness`]: ready for traffic or not, as the named gRPC health service and `/readyz` say.
//! - [`ready`]: the line a process prints once it listens, so a parent can find its ports.
//! - [`tls`]: mutual TLS, the roles certificates name, and the check of each call's role.
//! - [`huge_pages`]: large per-call buffers backed by transparent huge pages.
//! - [`freed_buffers`]: glibc's allocator set to keep a call's freed buffers for the next call.
//! - [`panic`](mod@panic): what a caught panic said, and the server layer that answers a call whose handler panicked.
//! - [`around_call`]: the one shape of the server layers around each call (metrics, panics, deadlines, TLS roles).

/// `tokio::io::AsyncWrite` for a connection wrapper that writes straight to its `inner` stream
/// (what it adds is on the read side, or in what it carries).
macro_rules! write_to_inner {
    (impl $([$($generics:tt)*])? for $wrapper:ty) => {
        impl $(<$($generics)*>)? tokio::io::AsyncWrite for $wrapper {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                data: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buffers: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, buffers)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

pub mod around_call;
pub mod backoff;
pub mod children;
pub mod clock;
pub mod deadline;
#[cfg(feature = "clap")]
pub mod flags;
pub mod freed_buffers;
pub mod grpc_metrics;
pub mod h2_channel;
pub mod heap_trim;
pub mod huge_pages;
#[cfg(any(test, feature = "log-capture"))]
pub mod log_capture;
pub mod metrics_http;
pub mod metrics_text;
pub mod otlp;
pub mod panic;
pub mod process_metrics;
pub mod readiness;
pub mod ready;
pub mod scoped_threads;
#[cfg(feature = "scripted-coordinator")]
pub mod scripted_coordinator;
pub mod shutdown;
pub mod tls;
pub mod tracing_setup;
pub mod transport;

/// Held by the tests that allocate or measure this process's resident memory, which would
/// otherwise see each other's megabytes come and go.
#[cfg(test)]
static RESIDENT_MEMORY_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
