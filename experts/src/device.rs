//! Where experts run: CUDA when present, else CPU, unless the operator says otherwise.

pub use switchyard_model::device::{DeviceChoice, ParseDeviceError};
use tch::Device;

/// Resolving a [`DeviceChoice`] needs libtorch (is CUDA there?), so it lives here, beside the
/// experts, while the choice itself is parsed where no libtorch is linked.
pub trait ResolveDevice {
    /// The tch device this choice resolves to on this machine.
    fn resolve(self) -> Device;
}

impl ResolveDevice for DeviceChoice {
    fn resolve(self) -> Device {
        match self {
            DeviceChoice::Auto => Device::cuda_if_available(),
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda(index) => Device::Cuda(index),
        }
    }
}

/// The name a device is reported by: `cpu` or `cuda:N`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(index) => format!("cuda:{index}"),
        _ => "cpu".to_owned(),
    }
}

/// Why a GPU could not be queried.
#[derive(Debug, thiserror::Error)]
pub enum GpuQueryError {
    /// No NVIDIA driver library here, or the driver refused.
    #[error("NVML: {0}")]
    Nvml(#[from] nvml_wrapper::error::NvmlError),
    #[error("cuda:{index} is not among CUDA_VISIBLE_DEVICES={visible}")]
    NotVisible { index: usize, visible: String },
}

/// Bytes free on the GPU behind `cuda:index`, as the driver's NVML reports them (loaded at run
/// time: a machine without the NVIDIA driver has none).
pub fn gpu_free_memory(index: usize) -> Result<u64, GpuQueryError> {
    with_nvml_device(index, |device| Ok(device.memory_info()?.free))
}

/// The compute capability (major, minor) of the GPU behind `cuda:index`, as NVML reports it.
pub fn gpu_compute_capability(index: usize) -> Result<(i32, i32), GpuQueryError> {
    with_nvml_device(index, |device| {
        let capability = device.cuda_compute_capability()?;
        Ok((capability.major, capability.minor))
    })
}

fn with_nvml_device<T>(
    index: usize,
    query: impl FnOnce(&nvml_wrapper::Device) -> Result<T, GpuQueryError>,
) -> Result<T, GpuQueryError> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let nvml = nvml_wrapper::Nvml::init()?;
    let device = match nvml_device(index, visible.as_deref())? {
        NvmlDevice::Index(index) => nvml.device_by_index(index)?,
        NvmlDevice::Uuid(uuid) => nvml.device_by_uuid(uuid)?,
    };
    query(&device)
}

/// How NVML names a CUDA device.
#[derive(Debug, PartialEq)]
enum NvmlDevice<'a> {
    Index(u32),
    Uuid(&'a str),
}

/// `CUDA_VISIBLE_DEVICES` renumbers devices for CUDA but not for NVML: `cuda:index` is its
/// `index`-th entry (an NVML index, or a `GPU-…`/`MIG-…` UUID) when it is set.
fn nvml_device(index: usize, visible: Option<&str>) -> Result<NvmlDevice<'_>, GpuQueryError> {
    let Some(visible) = visible.filter(|visible| !visible.trim().is_empty()) else {
        return Ok(NvmlDevice::Index(index as u32));
    };
    let entry = visible
        .split(',')
        .map(str::trim)
        .nth(index)
        .ok_or_else(|| GpuQueryError::NotVisible { index, visible: visible.to_owned() })?;
    Ok(entry.parse().map_or(NvmlDevice::Uuid(entry), NvmlDevice::Index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_indices_follow_cuda_visible_devices_into_nvml() {
        assert_eq!(nvml_device(1, None).ok(), Some(NvmlDevice::Index(1)));
        assert_eq!(nvml_device(0, Some("")).ok(), Some(NvmlDevice::Index(0)));
        assert_eq!(nvml_device(1, Some("2, 3")).ok(), Some(NvmlDevice::Index(3)));
        assert_eq!(nvml_device(0, Some("GPU-8a1b,GPU-77")).ok(), Some(NvmlDevice::Uuid("GPU-8a1b")));
        let error = nvml_device(2, Some("0,1")).unwrap_err().to_string();
        assert_eq!(error, "cuda:2 is not among CUDA_VISIBLE_DEVICES=0,1");
    }

    /// Without an NVIDIA driver (CI, the development machine) reading fails with an error, never
    /// a panic or a made-up figure.
    #[test]
    fn without_a_driver_gpu_memory_is_an_error() {
        if std::path::Path::new("/proc/driver/nvidia").exists() {
            return;
        }
        assert!(matches!(gpu_free_memory(0), Err(GpuQueryError::Nvml(_))));
    }

    #[test]
    fn a_cpu_choice_resolves_to_the_cpu() {
        assert_eq!(device_name(DeviceChoice::Cpu.resolve()), "cpu");
    }
}
