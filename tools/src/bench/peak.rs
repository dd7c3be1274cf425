//! The device's matrix-product peak, measured in the same run as the points it is a yardstick for:
//! expert compute is reported as a share of it (f32 GEMM per thread count on a CPU, bf16 tensor
//! cores on a GPU).

use serde::{Deserialize, Serialize};
use switchyard_experts::device::device_name;
use switchyard_experts::peak::{self, MatmulPeak};
use switchyard_model::WeightDtype;
use tch::Device;

/// One measured peak, as the report keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicePeak {
    pub device: String,
    pub dtype: String,
    pub threads: u32,
    /// The side of the square matrices multiplied.
    pub size: u32,
    pub gflops: f64,
}

impl From<MatmulPeak> for DevicePeak {
    fn from(peak: MatmulPeak) -> Self {
        Self {
            device: device_name(peak.device),
            dtype: peak.dtype.to_string(),
            threads: peak.threads.max(0) as u32,
            size: peak.size.max(0) as u32,
            gflops: peak.flops_per_second / 1e9,
        }
    }
}

/// Measures the peak of `device` in `dtype` once per thread count (once in all on a GPU, whose
/// rate does not depend on host threads), off the async runtime.
pub async fn measure(device: Device, dtype: WeightDtype, thread_counts: &[u32]) -> Vec<DevicePeak> {
    let mut counts: Vec<u32> =
        if device.is_cuda() { thread_counts.iter().copied().take(1).collect() } else { thread_counts.to_vec() };
    counts.sort_unstable();
    counts.dedup();
    tokio::task::spawn_blocking(move || {
        counts
            .into_iter()
            .map(|threads| {
                DevicePeak::from(peak::measure(device, dtype, threads.max(1) as i32, peak::default_size(device), 5))
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// The peak measured with `threads` threads (on a GPU, the only one).
pub fn for_threads(peaks: &[DevicePeak], threads: u32) -> Option<f64> {
    let gpu = peaks.iter().find(|peak| peak.device.starts_with("cuda"));
    gpu.or_else(|| peaks.iter().find(|peak| peak.threads == threads)).map(|peak| peak.gflops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peak(device: &str, threads: u32, gflops: f64) -> DevicePeak {
        DevicePeak { device: device.into(), dtype: "f32".into(), threads, size: 1024, gflops }
    }

    #[test]
    fn a_cpu_peak_is_found_by_thread_count_and_a_gpu_peak_serves_every_count() {
        let cpu = [peak("cpu", 1, 100.0), peak("cpu", 2, 190.0)];
        assert_eq!(for_threads(&cpu, 2), Some(190.0));
        assert_eq!(for_threads(&cpu, 3), None);
        assert_eq!(for_threads(&[peak("cuda:0", 1, 800_000.0)], 4), Some(800_000.0));
    }

    #[test]
    fn a_report_keeps_a_peak_in_gflops() {
        let measured =
            MatmulPeak { device: Device::Cpu, dtype: WeightDtype::F32, threads: 2, size: 512, flops_per_second: 2.5e9 };
        assert_eq!(DevicePeak::from(measured), DevicePeak { size: 512, ..peak("cpu", 2, 2.5) });
    }

    #[tokio::test]
    async fn each_thread_count_is_measured_once() {
        let peaks = measure(Device::Cpu, WeightDtype::F32, &[1, 1]).await;
        assert_eq!(peaks.len(), 1, "{peaks:?}");
        let only = &peaks[0];
        assert_eq!((only.device.as_str(), only.dtype.as_str(), only.threads), ("cpu", "f32", 1));
        assert!(only.gflops > 0.0, "{only:?}");
    }
}
