//! Expert FFNs on libtorch (via tch), shared by the expert worker, which serves them, and the
//! router client's in-process reference layer, which recomputes them without a network.
//!
//! - [`expert`]: one expert (SwiGLU or GELU) on a device, built from seeded synthetic weights.
//! - [`device`]: choosing CUDA when present, else CPU.

pub mod device;
pub mod expert;

pub use device::{DeviceChoice, ParseDeviceError};
pub use expert::Expert;
