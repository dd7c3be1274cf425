//! Process plumbing shared by `switchyard-coordinator`, `switchyard-worker` and `switchyard`:
//!
//! - [`tracing_setup`]: one `init_tracing(format)` for every binary (text or JSON, `RUST_LOG`).
//! - [`metrics_http`]: the Prometheus `/metrics` endpoint.
//! - [`transport`]: HTTP/2 windows, frame and message size limits, set alike on servers and clients.
//! - [`shutdown`]: Ctrl-C / SIGTERM as a future.
//! - [`children`]: child processes that die with their parent, for `switchyard local` and tests.
//! - [`clock`]: Unix-epoch timestamps for times measured across processes.
//! - [`ready`]: the line a process prints once it listens, so a parent can find its ports.

pub mod children;
pub mod clock;
pub mod metrics_http;
pub mod ready;
pub mod shutdown;
pub mod tls;
pub mod tracing_setup;
pub mod transport;
