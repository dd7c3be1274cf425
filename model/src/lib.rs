//! The model every process agrees on, without libtorch (the coordinator links none):
//!
//! - [`spec`]: the validated [`ModelSpec`] and its sizes.
//! - [`dtype`]: weight element types, and weights as typed bytes (read as stored, never upcast).
//! - [`family`]: the published architectures served, and the capacity policy each implies.
//! - [`capacity`]: the capacity policies (dropless, factor, per-sequence) and the capacity rule.
//! - [`router_spec`]: what a model's router computes (scores, groups, scaling, biases).
//! - [`synthetic`]: seeded weights that are a pure function of `(seed, layer, expert)`.
//! - [`checkpoint`]: checkpoints of every family by their public tensor names and `config.json`.
//! - [`ids`]: `ExpertId`, `TableVersion`, `RequestId`: the identities domain code passes around.
//! - [`mxfp4`]: dequantizing GPT-OSS's MXFP4 experts.
//! - [`safetensors`]: reading single tensors of a (sharded) safetensors checkpoint by their offsets.
//!
//! The experts themselves, on tch, live in `switchyard-experts`.

pub mod capacity;
pub mod checkpoint;
#[cfg(feature = "clap")]
pub mod cli;
pub mod device;
pub mod dtype;
pub mod family;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod ids;
pub mod mxfp4;
pub mod router_spec;
pub mod safetensors;
pub mod spec;
pub mod synthetic;

pub use capacity::{CapacityPolicy, expert_capacity};
pub use dtype::{HostTensor, WeightDtype};
pub use family::Family;
pub use ids::{ExpertId, RequestId, TableVersion};
pub use router_spec::{GroupScore, RouterSpec, Scoring};
pub use spec::{Activation, DEFAULT_CAPACITY_FACTOR, ModelSpec, SpecError};
