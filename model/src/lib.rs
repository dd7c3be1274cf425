//! The numerical heart of Switchyard, shared by expert workers (which serve experts) and the
//! router client (whose in-process reference layer recomputes them without a network).
//!
//! - [`spec`]: the validated [`ModelSpec`] and its sizes.
//! - [`synthetic`]: seeded weights that are a pure function of `(seed, layer, expert)`.
//! - [`expert`]: one expert FFN (SwiGLU or GELU) on a tch device.
//! - [`device`]: choosing CUDA when present, else CPU.

pub mod device;
pub mod expert;
pub mod spec;
pub mod synthetic;

pub use device::{DeviceChoice, ParseDeviceError};
pub use expert::Expert;
pub use spec::{Activation, ModelSpec, SpecError};
