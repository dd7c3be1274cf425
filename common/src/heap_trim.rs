//! Freed heap memory given back to the system on a timer (glibc's `malloc_trim`).
//!
//! A worker's steps allocate transient tensors of megabytes and free them at once. glibc raises
//! its mmap threshold as such blocks are freed, after which they come from the heap, whose free
//! pages it returns only now and then: under a steady overload a worker's RSS swings by a third
//! with nothing more held. Trimming every quarter second returns those pages (`madvise` on every
//! free run of the heaps, not only their tops) while the steps in between reuse the heap as before;
//! a fixed 1 MiB mmap threshold also held RSS, at ~12% of a CPU worker's capacity, every block
//! faulted in afresh (docs/bench/resilience).

use std::time::Duration;

/// Starts a thread that trims the heaps every `interval`, for the rest of the process; nothing
/// with a zero interval or where the C library is not glibc.
pub fn spawn_heap_trimmer(interval: Duration) -> std::io::Result<()> {
    if interval.is_zero() || !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return Ok(());
    }
    std::thread::Builder::new().name("switchyard-heap-trim".into()).spawn(move || {
        loop {
            std::thread::sleep(interval);
            trim();
        }
    })?;
    Ok(())
}

/// Returns the free pages of every heap to the system; whether any were.
#[allow(unsafe_code)]
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes each arena's lock itself; 0 keeps no padding at a heap's top.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    fn resident_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
        let pages: u64 = statm.split_whitespace().nth(1).and_then(|field| field.parse().ok()).expect("resident pages");
        pages * 4096
    }

    /// 16 MiB freed in 64 KiB blocks (below the mmap threshold: heap memory) under a few blocks
    /// still held stay resident until a trim returns them.
    #[test]
    fn trimming_returns_freed_heap_pages() {
        let _alone = crate::RESIDENT_MEMORY_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let blocks: Vec<Vec<u8>> = (0..256).map(|i| vec![i as u8 | 1; 64 * 1024]).collect();
        let held: Vec<Vec<u8>> = blocks.iter().step_by(64).cloned().collect();
        drop(blocks);
        let before = resident_bytes();
        assert!(trim(), "the freed blocks are free pages in the heap");
        let returned = before.saturating_sub(resident_bytes());
        assert!(returned >= 8 << 20, "{returned} bytes returned of the 16 MiB freed");
        assert!(held.iter().all(|block| block.len() == 64 * 1024));
    }
}
