//! Moving a step's rows to the device and its answers back through host buffers reused across
//! steps. On CUDA they are pinned (page-locked): a copy runs at the bus's rate (on an H200 host,
//! 55 GB/s against 15 from pageable memory) and the host→device copy is asynchronous, queued before
//! the step's kernels on the same stream. On a CPU the "device" is host memory: rows are packed
//! once and viewed in place, and answers are sent from the tensors that hold them, unless the
//! worker is asked to move them as a GPU does ([`Transfers`]).

use std::collections::VecDeque;

use bytes::Bytes;
use tch::{Device, Kind, Tensor};

use switchyard_common::scoped_threads::{chunks_for, in_turns};

use crate::answer_buffers::{AnswerBuffers, host_buffer};

/// Where each run of rows starts: any element type can be viewed there, and GPU kernels get the
/// 16-byte alignment their vector loads want.
pub const ALIGN: usize = 16;

/// How a step's rows reach its experts and their answers come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfers {
    /// Rows viewed where they were packed, answers sent from the tensors that hold them: a CPU's.
    InPlace,
    /// Rows copied to the device in one upload (with token-major parts' indices and weights and
    /// grouped products' row ends), every answer copied back in one download: a GPU's, whose
    /// memory is its own. A CPU worker moves them so when asked, so that the bookkeeping of this
    /// path is tested where no GPU is.
    Copied,
}

impl Transfers {
    /// A GPU's always copy; a CPU's copy when `copied_on_cpu`.
    pub fn for_device(device: Device, copied_on_cpu: bool) -> Self {
        if device.is_cuda() || copied_on_cpu { Self::Copied } else { Self::InPlace }
    }
}

#[derive(Debug)]
pub struct Staging {
    device: Device,
    transfers: Transfers,
    /// Cores this process may use, read once: the most threads an upload is packed by.
    cores: usize,
    upload: Option<Tensor>,
    answers: AnswerBuffers,
    /// An upload was queued and no download has waited for it since: its host buffer may still be
    /// read by the copy engine.
    upload_in_flight: bool,
}

impl Staging {
    pub fn new(device: Device, transfers: Transfers) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let answers = AnswerBuffers::new(device);
        Self { device, transfers, cores, upload: None, answers, upload_in_flight: false }
    }

    pub fn transfers(&self) -> Transfers {
        self.transfers
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
        let buffer = upload_buffer(&mut self.upload, self.device, total);
        let pieces: Vec<(usize, &[u8])> = runs
            .iter()
            .zip(&offsets)
            .flat_map(|(run, &offset)| {
                run.iter().scan(offset, |at, slice| {
                    let piece = (*at, *slice);
                    *at += slice.len();
                    Some(piece)
                })
            })
            .collect();
        pack(writable(&mut *buffer, total), &pieces, pack_threads(total, self.cores));
        let staged = buffer.narrow(0, 0, total as i64);
        if self.transfers == Transfers::InPlace {
            return (staged, offsets);
        }
        self.upload_in_flight = true;
        // A copy even where the device is the CPU: the step then reads memory of its own, as on a GPU.
        (staged.to_device_(self.device, Kind::Uint8, true, true), offsets)
    }

    /// Brings `parts` (flat `u8` tensors on the device) to the host: copied, back to back into one
    /// buffer (pinned on CUDA) the answers are then sent from (see [`AnswerBuffers`]), with one
    /// device→host copy of them all, which waits for the step's kernels; in place, each part is
    /// handed over as the bytes it is, without a copy, unless it is a view of the upload buffer
    /// (an identity expert's answer), which the next step overwrites.
    pub fn download(&mut self, parts: &[Tensor]) -> HostAnswers {
        if self.transfers == Transfers::InPlace {
            return HostAnswers { parts: parts.iter().map(|part| self.host_bytes(part)).collect() };
        }
        let total: usize = parts.iter().map(Tensor::numel).sum();
        if total == 0 {
            // Nothing finished this step (every sum waits for a later part): nothing to wait for yet.
            return HostAnswers { parts: VecDeque::new() };
        }
        let joined = Tensor::cat(parts, 0);
        let landing = self.answers.take(total);
        landing.tensor().narrow(0, 0, total as i64).copy_(&joined);
        self.upload_in_flight = false;
        HostAnswers { parts: VecDeque::from([landing.into_bytes(total)]) }
    }

    /// One host part's bytes: its own memory, or a copy when it lies in the upload buffer.
    fn host_bytes(&self, part: &Tensor) -> Bytes {
        let part = part.contiguous();
        if part.numel() == 0 {
            return Bytes::new();
        }
        let in_upload = self.upload.as_ref().is_some_and(|upload| overlap(upload, &part));
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

/// Whether two host tensors' bytes overlap.
fn overlap(a: &Tensor, b: &Tensor) -> bool {
    let bytes = |tensor: &Tensor| {
        let start = tensor.data_ptr() as usize;
        start..start + tensor.numel() * tensor.kind().elt_size_in_bytes()
    };
    let (a, b) = (bytes(a), bytes(b));
    a.start < b.end && b.start < a.end
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

/// Packs in parallel above this many bytes per thread: a copy of ~0.5-1 ms against the ~50-100 µs
/// a thread costs to start. On an H200 host one thread packed a 33 MB step in 8 ms.
const PACK_BYTES_PER_THREAD: usize = 4 << 20;
const MOST_PACK_THREADS: usize = 4;

/// Threads worth packing `bytes` with, on `cores` cores.
fn pack_threads(bytes: usize, cores: usize) -> usize {
    (bytes / PACK_BYTES_PER_THREAD).clamp(1, MOST_PACK_THREADS.min(cores).max(1))
}

/// Copies each `(at, bytes)` piece into `buffer` at `at`, the buffer cut into contiguous parts
/// that `threads` threads (the calling one among them) take in turns, each filling its part with
/// whatever pieces overlap it.
fn pack(buffer: &mut [u8], pieces: &[(usize, &[u8])], threads: usize) {
    let fill = |part: &mut [u8], start: usize| {
        let end = start + part.len();
        for &(at, bytes) in pieces {
            let (from, to) = (at.max(start), (at + bytes.len()).min(end));
            if from < to {
                part[from - start..to - start].copy_from_slice(&bytes[from - at..to - at]);
            }
        }
    };
    if threads <= 1 || buffer.is_empty() {
        return fill(buffer, 0);
    }
    let part_len = buffer.len().div_ceil(chunks_for(threads));
    in_turns("switchyard-pack", threads, buffer.chunks_mut(part_len).enumerate(), |(index, part)| {
        fill(part, index * part_len);
    });
}

/// The first `len` bytes of a host `u8` buffer, to write. tch has no safe way to write host memory
/// into an existing tensor, and the alternative, a temporary tensor per part, would copy every row
/// twice.
#[allow(unsafe_code)]
fn writable(buffer: &mut Tensor, len: usize) -> &mut [u8] {
    assert!(buffer.device() == Device::Cpu && buffer.kind() == Kind::Uint8 && buffer.is_contiguous());
    assert!(len <= buffer.numel(), "{len} bytes of a {}-byte buffer", buffer.numel());
    if len == 0 {
        return &mut [];
    }
    // SAFETY: checked above: a contiguous host `u8` tensor of at least `len` elements, which libtorch
    // allocated and Rust holds no other reference into. Only `Staging` holds it, on this thread, for
    // as long as the slice lives, and nothing reads it meanwhile: on a CPU the previous step is done
    // with it, on CUDA its last copy was waited for before this upload.
    unsafe { std::slice::from_raw_parts_mut(buffer.data_ptr().cast::<u8>(), len) }
}

/// The upload buffer, of at least `bytes` (pinned when `device` is a GPU), grown to the next power
/// of two when too small so that steps of varying size soon stop allocating.
fn upload_buffer(slot: &mut Option<Tensor>, device: Device, bytes: usize) -> &mut Tensor {
    let fits = slot.as_ref().is_some_and(|buffer| buffer.numel() >= bytes);
    if !fits {
        *slot = Some(host_buffer(device, bytes.max(ALIGN).next_power_of_two()));
    }
    slot.as_mut().expect("allocated above")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_start_aligned_and_answers_come_back_in_order() {
        let mut staging = Staging::new(Device::Cpu, Transfers::InPlace);
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
    fn tensors_overlap_when_they_share_a_byte() {
        let buffer = Tensor::zeros([64], (Kind::Uint8, Device::Cpu));
        let part = |start: i64, len: i64| buffer.narrow(0, start, len);
        assert!(overlap(&part(0, 16), &part(15, 8)) && overlap(&part(15, 8), &part(0, 16)), "one byte shared");
        assert!(overlap(&part(0, 64), &part(20, 4)) && overlap(&part(20, 4), &part(0, 64)), "one inside the other");
        assert!(!overlap(&part(0, 16), &part(16, 8)) && !overlap(&part(16, 8), &part(0, 16)), "adjacent");
        let floats = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let bytes = floats.view_dtype(Kind::Uint8);
        assert!(overlap(&floats, &bytes.narrow(0, 15, 1)), "a float tensor's last byte is its");
        assert!(!overlap(&floats.narrow(0, 0, 2), &bytes.narrow(0, 8, 8)), "two floats are 8 bytes");
    }

    #[test]
    fn a_parallel_pack_writes_what_one_thread_writes() {
        let rows: Vec<Vec<u8>> =
            (0..5u8).map(|run| (0..37).map(|i| run.wrapping_mul(41).wrapping_add(i)).collect()).collect();
        // Pieces of uneven length at uneven offsets, with gaps, crossing the threads' parts.
        let pieces: Vec<(usize, &[u8])> =
            rows.iter().enumerate().map(|(run, row)| (run * 40 + run % 3, &row[..30 + run])).collect();
        let mut serial = vec![0u8; 210];
        pack(&mut serial, &pieces, 1);
        for (at, bytes) in &pieces {
            assert_eq!(&serial[*at..*at + bytes.len()], *bytes);
        }
        for threads in [0, 2, 3, 7] {
            let mut parallel = vec![0u8; 210];
            pack(&mut parallel, &pieces, threads);
            assert_eq!(parallel, serial, "{threads} threads (0: one)");
        }
        pack(&mut [], &[], 4);
    }

    #[test]
    fn packing_goes_parallel_only_for_megabytes() {
        assert_eq!(pack_threads(0, 16), 1);
        assert_eq!(pack_threads(PACK_BYTES_PER_THREAD * 2 - 1, 16), 1);
        assert_eq!(pack_threads(PACK_BYTES_PER_THREAD * 2, 16), 2);
        assert_eq!(pack_threads(PACK_BYTES_PER_THREAD * 2, 1), 1, "one core");
        assert_eq!(pack_threads(usize::MAX / 2, 16), MOST_PACK_THREADS);
        assert_eq!(pack_threads(usize::MAX / 2, 3), 3);
        assert_eq!(pack_threads(usize::MAX / 2, 0), 1);
    }

    #[test]
    fn a_computed_answer_is_sent_from_its_own_memory() {
        let mut staging = Staging::new(Device::Cpu, Transfers::InPlace);
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

    #[test]
    fn a_gpu_always_copies_and_a_cpu_when_asked() {
        assert_eq!(Transfers::for_device(Device::Cuda(0), false), Transfers::Copied);
        assert_eq!(Transfers::for_device(Device::Cuda(1), true), Transfers::Copied);
        assert_eq!(Transfers::for_device(Device::Cpu, true), Transfers::Copied);
        assert_eq!(Transfers::for_device(Device::Cpu, false), Transfers::InPlace);
    }

    /// Copied, a step's rows are memory of their own, as a device's are: the next upload, which
    /// reuses the host buffer, leaves them as they were. In place they are that buffer.
    #[test]
    fn copied_rows_are_memory_of_their_own_and_rows_in_place_the_upload_buffer() {
        for transfers in [Transfers::InPlace, Transfers::Copied] {
            let mut staging = Staging::new(Device::Cpu, transfers);
            let (first, _) = staging.upload(&[vec![&[7u8; 32][..]]]);
            let in_buffer = staging.upload.as_ref().is_some_and(|buffer| overlap(buffer, &first));
            let _next = staging.upload(&[vec![&[9u8; 32][..]]]);
            let mut bytes = [0u8; 32];
            first.copy_data_u8(&mut bytes, 32);
            match transfers {
                Transfers::InPlace => assert!(in_buffer && bytes == [9; 32], "a view of the reused buffer"),
                Transfers::Copied => assert!(!in_buffer && bytes == [7; 32], "a copy the next step leaves alone"),
            }
        }
    }

    /// Copied, every answer of a step comes back in one buffer, in download order; a step that
    /// finishes nothing downloads nothing.
    #[test]
    fn copied_answers_come_back_in_one_buffer_and_nothing_is_downloaded_for_nothing() {
        let mut staging = Staging::new(Device::Cpu, Transfers::Copied);
        let (staged, _) = staging.upload(&[vec![&[1u8, 2, 3, 4, 5, 6][..]]]);
        let computed = Tensor::from_slice(&[8u8, 9]);
        let mut answers = staging.download(&[staged.narrow(0, 1, 3), computed]);
        let (first, second) = (answers.take(3), answers.take(2));
        assert_eq!((&first[..], &second[..]), (&[2u8, 3, 4][..], &[8u8, 9][..]));
        assert_eq!(first.as_ptr() as usize + 3, second.as_ptr() as usize, "one buffer, back to back");
        let mut nothing = staging.download(&[]);
        assert!(nothing.take(0).is_empty());
        let mut empty = staging.download(&[Tensor::zeros([0], (Kind::Uint8, Device::Cpu))]);
        assert!(empty.take(0).is_empty());
    }
}
