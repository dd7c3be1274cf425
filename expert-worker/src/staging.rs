//! Moving a step's rows to the device and its answers back through host buffers reused across
//! steps. On CUDA they are pinned (page-locked): a copy runs at the bus's rate (on an H200 host,
//! 55 GB/s against 15 from pageable memory) and the host→device copy is asynchronous, queued before
//! the step's kernels on the same stream. On a CPU the "device" is host memory: rows are packed
//! once and viewed in place, answers copied once.

use tch::{Device, Kind, Tensor};

/// Where each run of rows starts: any element type can be viewed there, and GPU kernels get the
/// 16-byte alignment their vector loads want.
pub const ALIGN: usize = 16;

#[derive(Debug)]
pub struct Staging {
    device: Device,
    upload: Option<Tensor>,
    download: Option<Tensor>,
    /// An upload was queued and no download has waited for it since: its host buffer may still be
    /// read by the copy engine.
    upload_in_flight: bool,
}

impl Staging {
    pub fn new(device: Device) -> Self {
        Self { device, upload: None, download: None, upload_in_flight: false }
    }

    /// Packs each run's slices back to back, each run at an [`ALIGN`]ed offset, in one host
    /// buffer, and returns it on the device (`[bytes]` of `u8`) with each run's offset.
    pub fn upload(&mut self, runs: &[Vec<&[u8]>]) -> (Tensor, Vec<usize>) {
        let mut offsets = Vec::with_capacity(runs.len());
        let mut total = 0;
        for run in runs {
            offsets.push(total);
            total += run.iter().map(|slice| slice.len()).sum::<usize>().next_multiple_of(ALIGN);
        }
        if self.upload_in_flight {
            self.synchronize();
        }
        let buffer = host_buffer(&mut self.upload, self.device, total);
        for (run, offset) in runs.iter().zip(&offsets) {
            let mut at = *offset;
            for slice in run {
                write_into(buffer, at, slice);
                at += slice.len();
            }
        }
        let staged = buffer.narrow(0, 0, total as i64);
        if !self.device.is_cuda() {
            return (staged, offsets);
        }
        self.upload_in_flight = true;
        (staged.to_device_(self.device, Kind::Uint8, true, false), offsets)
    }

    /// Copies `parts` (flat `u8` tensors on the device) back to back into one host `Vec`; on CUDA
    /// with one device→host copy of them all, which waits for the step's kernels.
    pub fn download(&mut self, parts: &[Tensor]) -> Vec<u8> {
        let total: usize = parts.iter().map(Tensor::numel).sum();
        let mut host = vec![0u8; total];
        if !self.device.is_cuda() {
            let mut offset = 0;
            for part in parts {
                let bytes = part.numel();
                part.contiguous().copy_data_u8(&mut host[offset..offset + bytes], bytes);
                offset += bytes;
            }
            return host;
        }
        let joined = Tensor::cat(parts, 0);
        let buffer = host_buffer(&mut self.download, self.device, total);
        let mut landing = buffer.narrow(0, 0, total as i64);
        landing.copy_(&joined);
        self.upload_in_flight = false;
        landing.copy_data_u8(&mut host, total);
        host
    }

    fn synchronize(&mut self) {
        if let Device::Cuda(index) = self.device {
            tch::Cuda::synchronize(index as i64);
        }
        self.upload_in_flight = false;
    }
}

/// Copies `bytes` into `buffer` at byte `at`. tch has no safe way to write host memory into an
/// existing tensor, and the alternative, a temporary tensor per part, would copy every row twice.
#[allow(unsafe_code)]
fn write_into(buffer: &Tensor, at: usize, bytes: &[u8]) {
    assert!(buffer.device() == Device::Cpu && buffer.kind() == Kind::Uint8 && buffer.is_contiguous());
    assert!(at + bytes.len() <= buffer.numel(), "{} bytes at {at} overrun {}", bytes.len(), buffer.numel());
    // SAFETY: checked above: `buffer` is a contiguous host `u8` tensor with room for `bytes` at
    // `at`. Only `Staging` holds it, on this thread, and nothing reads it meanwhile: on a CPU the
    // previous step is done with it, on CUDA its last copy was waited for before this upload.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buffer.data_ptr().cast::<u8>().add(at), bytes.len()) };
}

/// A host buffer of at least `bytes` (pinned when `device` is a GPU), grown to the next power of
/// two when too small so that steps of varying size soon stop allocating.
fn host_buffer(slot: &mut Option<Tensor>, device: Device, bytes: usize) -> &Tensor {
    let fits = slot.as_ref().is_some_and(|buffer| buffer.numel() >= bytes);
    if !fits {
        let size = bytes.max(ALIGN).next_power_of_two() as i64;
        let buffer = Tensor::empty([size], (Kind::Uint8, Device::Cpu));
        *slot = Some(if device.is_cuda() { buffer.pin_memory(device) } else { buffer });
    }
    slot.as_ref().expect("allocated above")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_start_aligned_and_answers_come_back_in_order() {
        let mut staging = Staging::new(Device::Cpu);
        let (a, b, c) = ([1u8, 2, 3], [4u8; 5], [9u8; 20]);
        let (staged, offsets) = staging.upload(&[vec![&a[..], &b[..]], vec![&c[..]]]);
        assert_eq!(offsets, [0, ALIGN]);
        assert_eq!(staged.numel(), 2 * ALIGN + ALIGN);
        let mut first = vec![0u8; 8];
        staged.narrow(0, 0, 8).copy_data_u8(&mut first, 8);
        assert_eq!(first, [1, 2, 3, 4, 4, 4, 4, 4]);
        let parts = [staged.narrow(0, ALIGN as i64, 20), staged.narrow(0, 1, 2)];
        let mut expected = c.to_vec();
        expected.extend([2, 3]);
        assert_eq!(staging.download(&parts), expected);
        // A smaller step reuses the buffer.
        let before = staging.upload.as_ref().map(Tensor::data_ptr);
        let _reused = staging.upload(&[vec![&a[..]]]);
        assert_eq!(staging.upload.as_ref().map(Tensor::data_ptr), before);
    }
}
