//! The Switchyard client library: what a model-serving process links to run MoE layers whose
//! experts live on other processes. No command-line, plotting or libtorch code: the `switchyard`
//! tool lives in `tools/`, the in-process reference layer in `reference/`.
//!
//! One layer call ([`MoeClient::forward`]) is plan → exchange → combine:
//! [`gate`] (logits) → [`routing`] (policy) → [`capacity`] (overflow) → [`router`] (groups by
//! expert) → [`dispatch`] (groups by worker, packed into requests) → every worker at once →
//! [`codec`] (decode, weighted combine). [`table`] keeps the routing table current; [`timing`] and
//! [`ledger`] say where the time and bytes went ([`metrics`] exports them).

pub mod capacity;
pub mod client;
pub mod codec;
pub mod dispatch;
pub mod error;
pub mod gate;
pub mod ledger;
pub mod metrics;
pub mod router;
pub mod routing;
pub mod stats;
pub mod table;
pub mod timing;

pub use client::{ClientOptions, LayerOutput, MoeClient};
pub use error::ClientError;
pub use ledger::{CommLedger, WorkerCall};
pub use router::{RoutingConfig, RoutingOverrides, RoutingSummary};
pub use table::{RoutingTableView, TableWatcher};
pub use timing::{ByteCounts, TimeBreakdown};
