//! libtorch's large CPU tensors backed by transparent huge pages.
//!
//! An expert on a CPU reads all its weights, megabytes, on every step. On 4 KiB pages that read
//! walks a page table entry per 4 KiB and misses the TLB throughout; on 2 MiB pages it takes one
//! entry per 2 MiB. c10's CPU allocator advises each allocation of 2 MiB or more as huge pages
//! (`madvise(MADV_HUGEPAGE)`) when `THP_MEM_ALLOC_ENABLE` is set, which it reads once, at its first
//! allocation; where the kernel's transparent huge pages are `madvise` (Debian's and most
//! distributions' default) nothing else backs the weights with them. On the 2-core development VM
//! (`switchyard bench --run sweep --workers 1,2 --experts 8 --top-k 2 --tokens 1`, six alternated
//! pairs) the in-process layer's 1-token call on the 512x1024 model took 1.12-1.20 ms with it against
//! 1.21-1.63 ms without, and on the 1024x4096 model 5.2-6.1 ms against 5.8-6.5 ms.
//!
//! That advice covers only the whole 2 MiB pages inside an allocation (c10 aligns it to 4 KiB), and
//! only pages not touched before: a 2 MiB weight straddles two huge pages and gets neither, and one
//! in memory the allocator had used before stays on the small pages it had. So an expert's weights
//! are copied to where a huge page begins and collapsed onto huge pages there ([`on_huge_pages`]).
//! A worker of the 512x1024 model's eight experts (48 MiB of weights) held 22 MiB on huge pages in
//! all before, 70 MiB after, and its 1-token calls' expert compute, 3-21% longer than the
//! in-process layer's before (mean 12%, `switchyard bench --run sweep --workers 1 --experts 8
//! --top-k 2 --dims 512x1024 --tokens 1`, 8 points), is now level with it (-14% to +7%, mean +2%).

use switchyard_common::huge_pages::{HUGE_PAGE, collapse_onto_huge_pages};
use tch::{Device, Kind, TchError, Tensor};

/// The variable c10's CPU allocator reads.
pub const VARIABLE: &str = "THP_MEM_ALLOC_ENABLE";

/// What [`advise_huge_page_tensors`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePageTensors {
    /// libtorch advises its CPU allocations of 2 MiB or more as huge pages.
    Advised,
    /// The environment sets [`VARIABLE`] already (`0` turns the advice off): the operator's
    /// setting stands.
    LeftToEnvironment,
}

/// Has libtorch advise its large CPU allocations as huge pages, unless the environment says
/// otherwise. Call it first in `main`, before libtorch's first CPU tensor.
///
/// # Safety
///
/// It sets an environment variable: no other thread may be running (one reading or writing the
/// environment at the same time is undefined behaviour), so call it before any thread starts.
#[allow(unsafe_code)]
pub unsafe fn advise_huge_page_tensors() -> HugePageTensors {
    if std::env::var_os(VARIABLE).is_some() {
        return HugePageTensors::LeftToEnvironment;
    }
    // SAFETY: the caller guarantees that no other thread runs yet.
    unsafe { std::env::set_var(VARIABLE, "1") };
    HugePageTensors::Advised
}

/// `tensor` where it benefits from huge pages: a CPU tensor of 2 MiB or more copied into
/// [`f_empty_weights`] and settled there; any other tensor as it is.
pub fn on_huge_pages(tensor: Tensor) -> Tensor {
    if tensor.device() != Device::Cpu || bytes_of(&tensor.size(), tensor.kind()) < HUGE_PAGE {
        return tensor;
    }
    let mut copy =
        f_empty_weights(&tensor.size(), tensor.kind(), Device::Cpu).expect("host memory for a weight's copy");
    copy.copy_(&tensor);
    settle_on_huge_pages(&copy);
    copy
}

/// An uninitialised tensor for weights, which live long and are read whole on every step: on a CPU,
/// from 2 MiB up, it begins where a huge page does (a view into an allocation 2 MiB larger, which it
/// keeps alive). Fill it, then [`settle_on_huge_pages`].
pub fn f_empty_weights(size: &[i64], kind: Kind, device: Device) -> Result<Tensor, TchError> {
    let bytes = bytes_of(size, kind);
    if device != Device::Cpu || bytes < HUGE_PAGE {
        return Tensor::f_empty(size, (kind, device));
    }
    let allocation = Tensor::f_empty([(bytes + HUGE_PAGE) as i64], (Kind::Uint8, Device::Cpu))?;
    let start = allocation.data_ptr() as usize;
    let offset = start.next_multiple_of(HUGE_PAGE) - start;
    allocation.f_narrow(0, offset as i64, bytes as i64)?.f_view_dtype(kind)?.f_view(size)
}

/// Collapses the whole huge pages of a filled CPU tensor's bytes onto huge pages (best effort: see
/// [`collapse_onto_huge_pages`]); a tensor on another device is left alone.
pub fn settle_on_huge_pages(tensor: &Tensor) {
    if tensor.device() == Device::Cpu {
        collapse_onto_huge_pages(tensor.data_ptr() as usize, bytes_of(&tensor.size(), tensor.kind()));
    }
}

fn bytes_of(size: &[i64], kind: Kind) -> usize {
    size.iter().product::<i64>() as usize * kind.elt_size_in_bytes()
}
