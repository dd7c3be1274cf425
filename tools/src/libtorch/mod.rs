//! The commands that compute with libtorch in this process, as `switchyard-torch` runs them.

mod bench;
mod device_check;
mod reference;

pub use bench::{BenchArgs, run as bench};
pub use device_check::{DeviceCheckArgs, run as device_check};
pub use reference::{loadtest_reference, local_compared};
