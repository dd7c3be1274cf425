//! Expert FFNs on libtorch (via tch), shared by the expert worker, which serves them, and the
//! router client's in-process reference layer, which recomputes them without a network.
//!
//! - [`expert`]: one expert (any [`switchyard_model::Activation`]) on a device, in one dtype, built
//!   from a checkpoint or from seeded synthetic weights.
//! - [`stack`]: experts of one shape whose weights are stacked, computed in one grouped product.
//! - [`device`]: choosing CUDA when present, else CPU.
//! - [`huge_pages`]: libtorch's large CPU tensors (the experts' weights) on transparent huge pages;
//!   [`host_memory`]: that and glibc's allocator set up first in a libtorch process's `main`.
//! - [`peak`]: the device's own matrix-product rate, the yardstick of expert compute.

pub mod device;
pub mod expert;
pub mod host_memory;
pub mod huge_pages;
pub mod peak;
pub mod stack;

pub use device::{DeviceChoice, ParseDeviceError, ResolveDevice};
pub use expert::{Expert, kind_of};
pub use stack::{ExpertStack, StackShape};
