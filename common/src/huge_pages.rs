//! Large buffers backed by transparent huge pages where the kernel offers them.
//!
//! A buffer of tens of megabytes that a process allocates and frees once per call (a layer's
//! output on the client) comes fresh from `mmap` each time, and its first touch faults it in one
//! 4 KiB page at a time: on DeepEP-normal's 117 MB output that was 28,000 faults, about a tenth of
//! the client machine's CPU time. Advised as huge pages, the same first touch takes one fault per
//! 2 MiB. The kernel decides (`/sys/kernel/mm/transparent_hugepage/enabled`: `always` or `madvise`
//! honour the advice, `never` ignores it and the buffer behaves as before).

use std::mem::MaybeUninit;

/// The huge page size of x86-64 and of arm64 with 4 KiB base pages.
pub const HUGE_PAGE: usize = 2 << 20;

/// Buffers from this size up get the advice: glibc maps them on their own at any setting of its
/// mmap threshold (whose ceiling is 32 MiB on 64-bit), so advising them never splits the heap's
/// mapping into pieces.
pub const ADVISED_FROM_BYTES: usize = 32 << 20;

/// A vector of `len` zeros whose pages, if it is [`ADVISED_FROM_BYTES`] or larger, are advised as
/// huge pages before they are first touched. Zeroed by writing rather than by `calloc`'s fresh
/// pages: those would first be mapped to the shared zero page on a read, then copied on the write
/// that follows, flushing the page from every other core's TLB each time.
pub fn zeroed_f32s(len: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(len);
    advise(values.spare_capacity_mut());
    values.resize(len, 0.0);
    values
}

/// Advises the whole huge pages inside `region` (nothing below [`ADVISED_FROM_BYTES`]). Returns
/// whether the kernel took the advice; refusing it is harmless, so callers may ignore the result.
fn advise<T>(region: &mut [MaybeUninit<T>]) -> bool {
    let bytes = std::mem::size_of_val(region);
    if bytes < ADVISED_FROM_BYTES {
        return false;
    }
    let start = region.as_mut_ptr() as usize;
    let first = start.next_multiple_of(HUGE_PAGE);
    let end = (start + bytes) / HUGE_PAGE * HUGE_PAGE;
    if end <= first {
        return false;
    }
    madvise_huge(first, end - first)
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn madvise_huge(address: usize, length: usize) -> bool {
    // SAFETY: [address, address + length) lies inside a live allocation the caller holds mutably
    // and has not initialised; MADV_HUGEPAGE changes how its pages are backed, never their contents.
    unsafe { libc::madvise(address as *mut libc::c_void, length, libc::MADV_HUGEPAGE) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn madvise_huge(_address: usize, _length: usize) -> bool {
    false
}

/// The kernel's transparent huge page mode, the word in brackets of
/// `/sys/kernel/mm/transparent_hugepage/enabled`: `always` and `madvise` honour advice, `never`
/// ignores it. `None` where the kernel does not say.
pub fn kernel_mode() -> Option<String> {
    let modes = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    chosen_mode(&modes).map(str::to_owned)
}

fn chosen_mode(modes: &str) -> Option<&str> {
    let (_, chosen) = modes.split_once('[')?;
    Some(chosen.split_once(']')?.0)
}

/// Whether the kernel backs advised memory with huge pages (`always` or `madvise`).
pub fn kernel_takes_advice() -> bool {
    matches!(kernel_mode().as_deref(), Some("always" | "madvise"))
}

/// Bytes of huge pages (`AnonHugePages`) backing this process's mappings that overlap
/// `[start, end)`: whether the kernel took the advice for a buffer, as tests and diagnostics see
/// it. Zero where `/proc/self/smaps` cannot be read.
pub fn huge_page_bytes_around(start: usize, end: usize) -> usize {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut overlapping = false;
    let mut total = 0;
    for line in smaps.lines() {
        let range = line.split_whitespace().next().and_then(|range| range.split_once('-'));
        if let Some((low, high)) = range
            && let (Ok(low), Ok(high)) = (usize::from_str_radix(low, 16), usize::from_str_radix(high, 16))
        {
            overlapping = low < end && start < high;
        } else if overlapping && let Some(kib) = line.strip_prefix("AnonHugePages:") {
            total += kib.trim().trim_end_matches("kB").trim().parse::<usize>().unwrap_or(0) * 1024;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_s_mode_is_the_word_in_brackets() {
        assert_eq!(chosen_mode("always [madvise] never\n"), Some("madvise"));
        assert_eq!(chosen_mode("[always] madvise never"), Some("always"));
        assert_eq!(chosen_mode("always madvise never"), None);
        assert_eq!(chosen_mode("always [madvise"), None);
    }

    /// Advice the kernel refuses (an address inside a page) reads as not taken.
    #[cfg(target_os = "linux")]
    #[test]
    fn refused_advice_is_not_taken() {
        let buffer: Vec<u8> = Vec::with_capacity(2 * HUGE_PAGE);
        assert!(!madvise_huge(buffer.as_ptr() as usize + 1, HUGE_PAGE));
    }

    #[test]
    fn a_small_buffer_is_not_advised() {
        let mut small: Vec<f32> = Vec::with_capacity(1 << 20);
        assert!(!advise(small.spare_capacity_mut()));
    }

    #[test]
    fn zeroed_f32s_holds_zeros_at_every_size() {
        let _alone = crate::RESIDENT_MEMORY_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for len in [0, 1, 4096, ADVISED_FROM_BYTES / 4 + 3] {
            let values = zeroed_f32s(len);
            assert_eq!(values.len(), len);
            assert!(values.iter().all(|value| *value == 0.0), "len {len}");
        }
    }

    /// Where the kernel offers huge pages on advice, a large output is backed by them once written.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_large_buffer_is_backed_by_huge_pages_where_the_kernel_offers_them() {
        let _alone = crate::RESIDENT_MEMORY_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !kernel_takes_advice() {
            eprintln!("skipped: transparent huge pages are off here ({:?})", kernel_mode());
            return;
        }
        let values = zeroed_f32s(ADVISED_FROM_BYTES / 4);
        let start = values.as_ptr() as usize;
        let huge = huge_page_bytes_around(start, start + ADVISED_FROM_BYTES);
        // 15 or 16 whole huge pages lie inside; the kernel may fall back to small pages for a few
        // where it finds no free 2 MiB at once.
        assert!(huge >= 8 * HUGE_PAGE, "{huge} bytes of huge pages in a 32 MiB output");
        assert_eq!(huge_page_bytes_around(0, 4096), 0, "nothing is mapped at address 0");
    }

    /// The advice is taken for a large buffer's whole huge pages, where the kernel offers them.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_takes_the_advice_for_a_large_buffer() {
        if !kernel_takes_advice() {
            eprintln!("skipped: transparent huge pages are off here ({:?})", kernel_mode());
            return;
        }
        let mut large: Vec<u8> = Vec::with_capacity(ADVISED_FROM_BYTES);
        assert!(advise(large.spare_capacity_mut()));
    }

    /// Where the kernel has transparent huge pages at all, it names one of its three modes.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_names_its_mode_where_it_has_one() {
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            assert!(matches!(kernel_mode().as_deref(), Some("always" | "madvise" | "never")), "{:?}", kernel_mode());
        }
    }
}
