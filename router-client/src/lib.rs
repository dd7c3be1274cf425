//! The Switchyard client library: what a model-serving process links to run MoE layers whose
//! experts live on other processes. No command-line, plotting or libtorch code: the `switchyard`
//! command lives in `loadtest/` and `tools/`, the in-process reference layer in `reference/`
//! ([`layer::InProcessLayer`] is how the load tester drives it).
//!
//! One layer call ([`MoeClient::forward`]) is plan → exchange → combine:
//! [`gate`] (logits) → [`routing`] (policy) → [`capacity`] (overflow) → [`router`] (groups by
//! expert) → [`dispatch`] (groups by worker, packed into requests) → [`exchange`] (every worker
//! at once over a [`transport`], answers handed over as they arrive, one outcome per worker) →
//! [`codec`] (decode, weighted combine). Every CPU step runs on the client's own pool ([`cpu`]),
//! never on the async runtime's threads. [`replicas`] picks each expert's holder; [`throttle`]
//! refuses calls to a worker that refuses most of what it is sent, before they cost anything.
//! [`table`] keeps the routing table current; [`timing`] and
//! [`ledger`] say where the time and bytes went ([`metrics`] exports them).

pub mod capacity;
pub mod client;
pub mod codec;
pub mod cpu;
pub mod dispatch;
pub mod error;
pub mod exchange;
pub mod gate;
mod gate_cache;
pub mod hidden;
pub mod layer;
pub mod ledger;
pub mod metrics;
pub mod projection;
pub mod refusal;
pub mod replicas;
pub mod router;
pub mod routing;
pub mod stats;
pub mod table;
pub mod throttle;
pub mod timing;
pub mod transport;

pub use client::{ClientOptions, LayerOutput, MoeClient, RefusalPolicy};
pub use dispatch::DispatchLayout;
pub use error::ClientError;
pub use hidden::Hidden;
pub use layer::{InProcessLayer, InProcessOutput};
pub use ledger::{CommLedger, WorkerCall};
pub use router::{RoutingConfig, RoutingOverrides, RoutingSummary};
pub use table::{RoutingTableView, TableWatcher};
pub use timing::{ByteCounts, TimeBreakdown};
pub use transport::{Endpoint, ExpertTransport, GrpcTransport};

/// The data behind `mutex`, also after a panic elsewhere poisoned it: what it guards (counters,
/// sums being built) stays usable.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
