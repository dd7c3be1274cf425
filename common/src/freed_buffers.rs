//! glibc's allocator set up so that the megabyte buffers a call frees are there for the next call.
//!
//! Every call on the data path allocates and frees buffers of megabytes: payloads, HTTP/2 frames
//! received, answers. By default glibc gives each thread an arena of its own, whose 64 MiB heaps
//! are unmapped once empty; maps blocks past a threshold that follows the last block freed; and
//! returns a heap's top to the system past 128 KiB free. A buffer freed at one call's end is then
//! often gone from memory when the next call asks, and the next call faults its buffers in afresh,
//! 4 KiB at a time: on the development VM a page fault costs ~2.5 µs, 0.6 ms per MiB, where the
//! loopback moves a MiB in 0.25 ms. `switchyard bench --run deepep --preset-calls 10` took 1.6-1.8
//! million faults with glibc's defaults and 0.7-0.8 million with the settings below (most of them
//! the processes' start and the bench's inputs), and DeepEP-normal's dispatch went from 36-47% to
//! 50-53% of single-connection TCP, its combine from 53-63% to 59-81% (runs alternated). A block
//! glibc maps on its own also starts 16 bytes into a page, where the kernel's copy of received
//! bytes runs 2-3x slower on that VM than at other offsets (`tools/examples/receive_alignment.rs`);
//! on the heap a block starts wherever the heap is.
//!
//! The settings: one arena (the data path's allocations are few and large; glibc's per-thread
//! caches still serve small ones without the arena's lock), a fixed mmap threshold at glibc's
//! largest (32 MiB), and no automatic trim. A process's heap then keeps the largest size its calls
//! took it to; the workers give back what stays unused with [`crate::heap_trim`]. A serving process
//! that embeds the client calls [`keep_freed_buffers`] first in its `main` as the binaries do.

/// What [`keep_freed_buffers`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreedBuffers {
    /// One arena, the largest fixed mmap threshold, no automatic trim.
    Kept,
    /// The environment sets glibc's allocator (`GLIBC_TUNABLES` naming `glibc.malloc.`, or a
    /// `MALLOC_*` variable such as `MALLOC_ARENA_MAX`): the operator's settings stand.
    LeftToEnvironment,
    /// glibc refused a setting (named); the allocator is as it was given.
    Refused(&'static str),
    /// Not glibc: nothing to set.
    NotGlibc,
}

impl FreedBuffers {
    /// Says what was set, once tracing is up: a refusal as a warning.
    pub fn log(self) {
        match self {
            Self::Refused(setting) => tracing::warn!(
                setting,
                "glibc refused an allocator setting: freed buffers may be unmapped and faulted in again"
            ),
            outcome => tracing::debug!(?outcome, "freed buffers kept for reuse"),
        }
    }
}

/// glibc's largest mmap threshold on 64-bit targets (`HEAP_MAX_SIZE / 2`): larger blocks are
/// mapped on their own (the client's output, the bench's inputs), and unmapped when freed.
const MMAP_THRESHOLD_BYTES: i32 = 32 << 20;

/// Sets glibc's allocator to keep freed buffers for reuse. Call it first in `main`, before any
/// thread starts (a thread running already may have an arena of its own).
#[allow(unsafe_code)]
pub fn keep_freed_buffers() -> FreedBuffers {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if allocator_set_by_environment() {
            return FreedBuffers::LeftToEnvironment;
        }
        let settings = [
            (libc::M_ARENA_MAX, 1, "M_ARENA_MAX"),
            (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES, "M_MMAP_THRESHOLD"),
            // -1 turns automatic trimming off (mallopt(3)).
            (libc::M_TRIM_THRESHOLD, -1, "M_TRIM_THRESHOLD"),
        ];
        for (parameter, value, name) in settings {
            // SAFETY: mallopt only changes the allocator's parameters, under its own lock.
            if unsafe { libc::mallopt(parameter, value) } != 1 {
                return FreedBuffers::Refused(name);
            }
        }
        FreedBuffers::Kept
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        FreedBuffers::NotGlibc
    }
}

/// Whether the environment configures glibc's allocator itself.
pub fn allocator_set_by_environment() -> bool {
    std::env::var("GLIBC_TUNABLES").is_ok_and(|tunables| tunables.contains("glibc.malloc."))
        || std::env::vars_os().any(|(name, _)| name.to_str().is_some_and(|name| name.starts_with("MALLOC_")))
}
