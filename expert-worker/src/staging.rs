//! Moving a step's rows to the device and its answers back through host buffers reused across
//! steps. On CUDA they are pinned (page-locked): a copy runs at the bus's rate (on an H200 host,
//! 55 GB/s against 15 from pageable memory) and the host→device copy is asynchronous, queued before
//! the step's kernels on the same stream. On a CPU the "device" is host memory: rows are packed
//! once and viewed in place, and answers are sent from the tensors that hold them.

use std::collections::VecDeque;

use bytes::Bytes;
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

    pub fn device(&self) -> Device {
        self.device
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

    /// Brings `parts` (flat `u8` tensors on the device) to the host: on CUDA back to back into one
    /// host buffer, with one device→host copy of them all, which waits for the step's kernels; on a
    /// CPU each part is handed over as the bytes it is, without a copy, unless it is a view of the
    /// upload buffer (an identity expert's answer), which the next step overwrites.
    pub fn download(&mut self, parts: &[Tensor]) -> HostAnswers {
        if !self.device.is_cuda() {
            return HostAnswers { parts: parts.iter().map(|part| self.host_bytes(part)).collect() };
        }
        let total: usize = parts.iter().map(Tensor::numel).sum();
        let mut host = vec![0u8; total];
        let joined = Tensor::cat(parts, 0);
        let buffer = host_buffer(&mut self.download, self.device, total);
        let mut landing = buffer.narrow(0, 0, total as i64);
        landing.copy_(&joined);
        self.upload_in_flight = false;
        landing.copy_data_u8(&mut host, total);
        HostAnswers { parts: VecDeque::from([Bytes::from(host)]) }
    }

    /// One host part's bytes: its own memory, or a copy when it lies in the upload buffer.
    fn host_bytes(&self, part: &Tensor) -> Bytes {
        let part = part.contiguous();
        if part.numel() == 0 {
            return Bytes::new();
        }
        let in_upload = self.upload.as_ref().is_some_and(|upload| {
            let (start, end) = (upload.data_ptr() as usize, upload.data_ptr() as usize + upload.numel());
            let at = part.data_ptr() as usize;
            at < end && at + part.numel() > start
        });
        let owned = HostBytes::new(part);
        if in_upload { Bytes::copy_from_slice(owned.as_ref()) } else { Bytes::from_owner(owned) }
    }

    fn synchronize(&mut self) {
        if let Device::Cuda(index) = self.device {
            tch::Cuda::synchronize(index as i64);
        }
        self.upload_in_flight = false;
    }
}

/// A step's answers on the host, handed out in download order.
#[derive(Debug)]
pub struct HostAnswers {
    parts: VecDeque<Bytes>,
}

impl HostAnswers {
    /// The next `size` bytes, from one downloaded part: an answer never straddles two.
    pub fn take(&mut self, size: usize) -> Bytes {
        if size == 0 {
            return Bytes::new();
        }
        while self.parts.front().is_some_and(Bytes::is_empty) {
            self.parts.pop_front();
        }
        let front = self.parts.front_mut().expect("answers within what was downloaded");
        assert!(size <= front.len(), "an answer of {size} bytes straddles two downloaded parts");
        front.split_to(size)
    }
}

/// A contiguous, non-empty host `u8` tensor read as bytes; holding it keeps its memory alive.
struct HostBytes(Tensor);

impl HostBytes {
    fn new(tensor: Tensor) -> Self {
        assert!(tensor.device() == Device::Cpu && tensor.kind() == Kind::Uint8 && tensor.is_contiguous());
        assert!(tensor.numel() > 0, "an empty tensor may have no memory to point at");
        Self(tensor)
    }
}

impl AsRef<[u8]> for HostBytes {
    #[allow(unsafe_code)]
    fn as_ref(&self) -> &[u8] {
        // SAFETY: checked in `new`: a contiguous, non-empty host `u8` tensor, so `numel` bytes from
        // its data pointer are its elements. Its memory lives as long as `self` holds the tensor, and
        // nothing writes it: it is a step's finished answer (an expert's fresh output, a finished
        // sum no later step adds to, or their dtype conversion), never the reused upload buffer.
        unsafe { std::slice::from_raw_parts(self.0.data_ptr().cast::<u8>(), self.0.numel()) }
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
        let mut answers = staging.download(&parts);
        let (first, second) = (answers.take(20), answers.take(2));
        // A smaller step reuses the buffer, overwriting what the answers were views of.
        let before = staging.upload.as_ref().map(Tensor::data_ptr);
        let _reused = staging.upload(&[vec![&[0u8; 32][..]]]);
        assert_eq!(staging.upload.as_ref().map(Tensor::data_ptr), before);
        assert_eq!((&first[..], &second[..]), (&c[..], &[2u8, 3][..]), "answers in the upload buffer were copied");
    }

    #[test]
    fn a_computed_answer_is_sent_from_its_own_memory() {
        let mut staging = Staging::new(Device::Cpu);
        let _ = staging.upload(&[vec![&[1u8; 64][..]]]);
        let computed = Tensor::from_slice(&[0.5f32, -2.0, 3.25]).view_dtype(Kind::Uint8);
        let at = computed.data_ptr() as usize;
        let mut answers = staging.download(&[computed.shallow_clone(), Tensor::zeros([0], (Kind::Uint8, Device::Cpu))]);
        assert_eq!(answers.take(0).len(), 0);
        let bytes = answers.take(12);
        assert_eq!(bytes.as_ptr() as usize, at, "the tensor's memory, not a copy");
        drop(computed);
        let values: Vec<f32> = bytes.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        assert_eq!(values, [0.5, -2.0, 3.25], "held alive by the answer");
    }
}
