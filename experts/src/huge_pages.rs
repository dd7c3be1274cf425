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
//! 1.21-1.63 ms without, and on the 1024x4096 model 5.2-6.1 ms against 5.8-6.5 ms; but a later A/B
//! within one process (`docs/bench/huge-pages/weights.py`, alternated blocks of calls) found the
//! same time on either page size, so that difference was most likely the VM's drift between runs.
//! The advice costs nothing and stays, without a measured gain (`docs/bench/journal.md`).

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
