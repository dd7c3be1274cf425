//! The Switchyard router client: the library a model-serving process links to run MoE layers whose
//! experts live on other processes, and the `switchyard` command-line tool built on it.
//!
//! One layer call ([`MoeClient::forward`]):
//! [`gate`] (logits) → [`routing`] (policy) → [`capacity`] (overflow) → [`router`] (groups by
//! expert) → [`dispatch`] (groups by worker, packed into requests) → all workers at once over gRPC →
//! [`codec`] (decode, weighted combine). [`table`] keeps the routing table current; [`timing`] and
//! [`ledger`] say where the time and bytes went ([`metrics`] exports them); [`reference`] computes the same layer in-process;
//! [`local_cluster`] starts a coordinator and workers as child processes.

pub mod bench;
pub mod capacity;
pub mod client;
pub mod codec;
pub mod dispatch;
pub mod error;
pub mod gate;
pub mod ledger;
pub mod loadtest;
pub mod local_cluster;
pub mod metrics;
pub mod reference;
pub mod router;
pub mod routing;
pub mod skew;
pub mod stats;
pub mod table;
pub mod timing;

pub use client::{ClientOptions, LayerOutput, MoeClient};
pub use error::ClientError;
pub use ledger::{CommLedger, WorkerCall};
pub use reference::{ReferenceLayer, ReferenceOutput, relative_frobenius_error};
pub use router::{RoutingConfig, RoutingOverrides, RoutingSummary};
pub use table::{RoutingTableView, TableWatcher};
pub use timing::{ByteCounts, TimeBreakdown};
