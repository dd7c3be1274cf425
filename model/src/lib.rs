//! The model every process agrees on, without libtorch (the coordinator links none):
//!
//! - [`spec`]: the validated [`ModelSpec`], its sizes and the expert capacity rule.
//! - [`synthetic`]: seeded weights that are a pure function of `(seed, layer, expert)`.
//! - [`checkpoint`]: Mixtral and Qwen2-MoE checkpoints by their public tensor names.
//! - [`safetensors`]: reading single tensors of a (sharded) safetensors checkpoint by their offsets.
//!
//! The experts themselves, on tch, live in `switchyard-experts`.

pub mod checkpoint;
#[cfg(feature = "clap")]
pub mod cli;
pub mod safetensors;
pub mod spec;
pub mod synthetic;

pub use spec::{Activation, ModelSpec, SpecError, expert_capacity};
