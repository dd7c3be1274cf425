//! Host buffers a GPU step's answers (or a CPU step's moved as on a GPU: `staging::Transfers`) are
//! downloaded into and sent from. The answers of a step hold their buffer until the last of them is
//! sent; it then goes back for a later step. A fresh buffer per step costs more than the copy itself:
//! on an H200 host a 51 MB download into a fresh allocation took 28 ms of page faults and copying,
//! against 1 ms for the device→host copy.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tch::{Device, Kind, Tensor};

/// Free buffers kept for later steps; more are dropped, the smallest first.
const KEEP_FREE: usize = 4;

type FreeList = Arc<Mutex<Vec<Tensor>>>;

/// The buffers of one worker's compute thread: pinned (page-locked) host memory when the device is
/// a GPU, so that a download runs at the bus's rate.
#[derive(Debug)]
pub struct AnswerBuffers {
    device: Device,
    free: FreeList,
}

impl AnswerBuffers {
    pub fn new(device: Device) -> Self {
        Self { device, free: Arc::default() }
    }

    /// A buffer of at least `bytes` (`u8`, on the host): the smallest free one that fits, else a new
    /// one of the next power of two, so that steps of varying size soon stop allocating.
    pub fn take(&self, bytes: usize) -> LentBuffer {
        let mut free = lock(&self.free);
        let fitting = free
            .iter()
            .enumerate()
            .filter(|(_, buffer)| buffer.numel() >= bytes)
            .min_by_key(|(_, buffer)| buffer.numel())
            .map(|(index, _)| index);
        let tensor = match fitting {
            Some(index) => free.swap_remove(index),
            None => host_buffer(self.device, bytes.max(1).next_power_of_two()),
        };
        LentBuffer { tensor: Some(tensor), free: self.free.clone() }
    }

    /// Buffers waiting for a step.
    pub fn free_count(&self) -> usize {
        lock(&self.free).len()
    }
}

/// A host buffer of `bytes`, pinned when `device` is a GPU.
pub fn host_buffer(device: Device, bytes: usize) -> Tensor {
    let buffer = Tensor::empty([bytes as i64], (Kind::Uint8, Device::Cpu));
    if device.is_cuda() { buffer.pin_memory(device) } else { buffer }
}

fn lock(free: &FreeList) -> std::sync::MutexGuard<'_, Vec<Tensor>> {
    // A panic elsewhere cannot leave a list of whole tensors half-changed.
    free.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A buffer taken from [`AnswerBuffers`]; it goes back when dropped, or when the last of the
/// [`Bytes`] made of it is.
#[derive(Debug)]
pub struct LentBuffer {
    tensor: Option<Tensor>,
    free: FreeList,
}

impl LentBuffer {
    pub fn tensor(&self) -> &Tensor {
        self.tensor.as_ref().expect("held until dropped")
    }

    /// Its first `len` bytes, which hold the buffer until they (and every slice of them) are dropped.
    pub fn into_bytes(self, len: usize) -> Bytes {
        assert!(len <= self.tensor().numel(), "{len} bytes of a {}-byte buffer", self.tensor().numel());
        if len == 0 {
            return Bytes::new();
        }
        Bytes::from_owner(Filled { buffer: self, len })
    }
}

impl Drop for LentBuffer {
    fn drop(&mut self) {
        let Some(tensor) = self.tensor.take() else { return };
        let mut free = lock(&self.free);
        free.push(tensor);
        if free.len() > KEEP_FREE {
            let smallest = (0..free.len()).min_by_key(|&index| free[index].numel()).expect("not empty");
            drop(free.swap_remove(smallest));
        }
    }
}

/// The filled start of a lent buffer, as the bytes an answer is sent from.
struct Filled {
    buffer: LentBuffer,
    len: usize,
}

impl AsRef<[u8]> for Filled {
    #[allow(unsafe_code)]
    fn as_ref(&self) -> &[u8] {
        let tensor = self.buffer.tensor();
        // SAFETY: `tensor` is a contiguous host `u8` tensor of at least `len` (> 0) elements (made
        // so by `host_buffer`, checked in `into_bytes`), alive as long as `self` holds it. Nothing
        // writes it meanwhile: only a step that took it from the free list writes a buffer, and it
        // is back there only once `self` is dropped.
        unsafe { std::slice::from_raw_parts(tensor.data_ptr().cast::<u8>(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(buffers: &AnswerBuffers, values: &[u8]) -> Bytes {
        let lent = buffers.take(values.len());
        lent.tensor().narrow(0, 0, values.len() as i64).copy_(&Tensor::from_slice(values));
        lent.into_bytes(values.len())
    }

    #[test]
    fn a_buffer_comes_back_once_its_last_answer_is_dropped() {
        let buffers = AnswerBuffers::new(Device::Cpu);
        let mut answers = filled(&buffers, &[1, 2, 3, 4, 5]);
        let first = answers.split_to(2);
        assert_eq!((&first[..], &answers[..]), (&[1u8, 2][..], &[3u8, 4, 5][..]));
        let at = first.as_ptr();
        drop(answers);
        assert_eq!(buffers.free_count(), 0, "an answer still holds it");
        drop(first);
        assert_eq!(buffers.free_count(), 1);
        let again = buffers.take(8);
        assert_eq!(again.tensor().data_ptr().cast::<u8>().cast_const(), at, "the same memory, reused");
        assert_eq!(again.tensor().numel(), 8, "5 bytes round up to 8");
    }

    #[test]
    fn buffers_in_use_are_never_lent_twice_and_the_smallest_fitting_one_is_taken() {
        let buffers = AnswerBuffers::new(Device::Cpu);
        let held = filled(&buffers, &[7; 16]);
        let (small, large) = (buffers.take(4), buffers.take(64));
        let (small_at, large_at) = (small.tensor().data_ptr(), large.tensor().data_ptr());
        drop((large, small));
        let other = filled(&buffers, &[9; 3]);
        assert_eq!(&held[..], &[7; 16], "a buffer in use was not written");
        assert_eq!(other.as_ptr(), small_at.cast::<u8>().cast_const(), "the 4-byte buffer fits 3 bytes best");
        assert_eq!(buffers.take(20).tensor().data_ptr(), large_at, "only the 64-byte one fits 20");
    }

    #[test]
    fn only_a_few_free_buffers_are_kept_and_the_smallest_go_first() {
        let buffers = AnswerBuffers::new(Device::Cpu);
        let lent: Vec<LentBuffer> = (0..KEEP_FREE + 2).map(|power| buffers.take(1 << power)).collect();
        drop(lent);
        assert_eq!(buffers.free_count(), KEEP_FREE);
        let taken: Vec<LentBuffer> = (0..KEEP_FREE).map(|_| buffers.take(1)).collect();
        let mut kept: Vec<usize> = taken.iter().map(|lent| lent.tensor().numel()).collect();
        kept.sort_unstable();
        let largest: Vec<usize> = (2..KEEP_FREE + 2).map(|power| 1 << power).collect();
        assert_eq!(kept, largest);
    }

    #[test]
    fn an_empty_answer_holds_no_buffer() {
        let buffers = AnswerBuffers::new(Device::Cpu);
        assert!(buffers.take(0).into_bytes(0).is_empty());
        assert_eq!(buffers.free_count(), 1, "given back at once");
    }
}
