//! A process that computes with libtorch sets up its host memory first in `main`: glibc's
//! allocator keeps the buffers calls free ([`switchyard_common::freed_buffers`]) and libtorch
//! advises its large CPU tensors, the experts' weights among them, as huge pages
//! ([`crate::huge_pages`]).

use switchyard_common::freed_buffers::{FreedBuffers, keep_freed_buffers};

use crate::huge_pages::{HugePageTensors, advise_huge_page_tensors};

/// What [`HostMemory::set_up`] did, to say once tracing is up.
#[derive(Debug, Clone, Copy)]
pub struct HostMemory {
    freed_buffers: FreedBuffers,
    huge_pages: HugePageTensors,
}

impl HostMemory {
    /// Sets up the allocators. Call it first in `main`.
    ///
    /// # Safety
    ///
    /// No other thread may be running: glibc settles its arenas at a second thread's first
    /// allocation, and [`advise_huge_page_tensors`] sets an environment variable, which another
    /// thread reading or writing the environment at the same time would make undefined behaviour.
    #[allow(unsafe_code)]
    pub unsafe fn set_up() -> Self {
        let freed_buffers = keep_freed_buffers();
        // SAFETY: the caller guarantees that no other thread runs yet.
        let huge_pages = unsafe { advise_huge_page_tensors() };
        Self { freed_buffers, huge_pages }
    }

    /// Says what was set: a refused allocator setting as a warning, the rest at debug level.
    pub fn log(self) {
        self.freed_buffers.log();
        tracing::debug!(outcome = ?self.huge_pages, "libtorch's large CPU tensors on huge pages");
    }
}
