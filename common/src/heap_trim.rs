//! Freed heap memory given back to the system once it has sat unused (glibc's `malloc_trim`).
//!
//! A worker's steps allocate transient tensors of megabytes and free them at once. They come from
//! the heap (glibc raises its mmap threshold as such blocks are freed; [`crate::freed_buffers`]
//! fixes it at its largest), whose free pages glibc returns only now and then, or, as the binaries
//! set it, never: under a steady overload a worker's RSS swings by a third with nothing more held.
//! `malloc_trim` returns those pages (`madvise` on every free run of the heaps, not only their
//! tops), but a trim on a plain timer also returns the buffers the next call takes again:
//! DeepEP-normal's 15 MiB requests were faulted in afresh on every call, ~15% of its dispatch
//! (docs/bench/resilience). So the trimmer samples how much free memory the heaps keep
//! resident, and trims only when some of it stayed unused for a whole interval: memory a steady
//! workload reuses dips at least once per interval and stays. A trim returns every free page, the
//! reused ones too, so it also waits until what sat unused is at least what the interval reused:
//! a trim then saves more than it makes the next calls fault in again.

use std::time::Duration;

/// Samples of the heaps' resident free memory per interval.
const SAMPLES_PER_INTERVAL: u32 = 16;

/// Less than this left unused through an interval is not worth a trim.
const WORTH_TRIMMING: u64 = 4 << 20;

/// Starts a thread that, every `interval`, returns the heaps' free pages to the system if some of
/// them stayed resident and unused all through it; nothing with a zero interval or where the C
/// library is not glibc.
pub fn spawn_heap_trimmer(interval: Duration) -> std::io::Result<()> {
    if interval.is_zero() || !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return Ok(());
    }
    std::thread::Builder::new().name("switchyard-heap-trim".into()).spawn(move || {
        let mut unused = UnusedFree::new(resident_not_in_use());
        loop {
            std::thread::sleep(interval / SAMPLES_PER_INTERVAL);
            let Some(resident) = resident_not_in_use() else { continue };
            if unused.observe(resident) {
                trim();
                unused = UnusedFree::new(resident_not_in_use());
            }
        }
    })?;
    Ok(())
}

/// The least and the most resident free heap memory over each interval's samples, against what
/// was resident and not in use right after the last trim (the process's code, stacks and other
/// mappings, which no trim returns).
#[derive(Debug, Clone, Copy)]
struct UnusedFree {
    after_trim: u64,
    least: u64,
    most: u64,
    samples: u32,
}

impl UnusedFree {
    fn new(after_trim: Option<u64>) -> Self {
        Self { after_trim: after_trim.unwrap_or(0), least: u64::MAX, most: 0, samples: 0 }
    }

    /// Takes one sample of resident bytes not in use by the heaps; at an interval's end, whether
    /// enough stayed unused all through it to trim: at least [`WORTH_TRIMMING`], and at least
    /// what the interval took from the free memory at its busiest (the least against the most),
    /// which the trim would make the next calls fault in again.
    fn observe(&mut self, resident_not_in_use: u64) -> bool {
        self.after_trim = self.after_trim.min(resident_not_in_use);
        let free = resident_not_in_use - self.after_trim;
        self.least = self.least.min(free);
        self.most = self.most.max(free);
        self.samples += 1;
        if self.samples < SAMPLES_PER_INTERVAL {
            return false;
        }
        let reused = self.most - self.least;
        let worth = self.least >= WORTH_TRIMMING.max(reused);
        self.least = u64::MAX;
        self.most = 0;
        self.samples = 0;
        worth
    }
}

/// The process's resident bytes less those the heaps hand out (in use, or mapped on their own):
/// its free heap pages, plus what no trim returns.
#[allow(unsafe_code)]
fn resident_not_in_use() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let resident = resident_bytes()?;
        // SAFETY: mallinfo2 only reads the allocator's counters, taking each arena's lock itself.
        let heaps = unsafe { libc::mallinfo2() };
        Some(resident.saturating_sub((heaps.uordblks + heaps.hblkhd) as u64))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// This process's resident bytes (`/proc/self/statm`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn resident_bytes() -> Option<u64> {
    let statm = procfs::process::Process::myself().ok()?.statm().ok()?;
    Some(statm.resident * procfs::page_size())
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

    const MIB: u64 = 1 << 20;

    fn interval(unused: &mut UnusedFree, samples: impl IntoIterator<Item = u64>) -> Vec<bool> {
        samples.into_iter().map(|sample| unused.observe(sample)).collect()
    }

    /// An interval's samples: `rest` bytes resident and not in use, except `dip` at one sample
    /// (a call taking the difference).
    fn one_dip(dip: u64, rest: u64) -> impl Iterator<Item = u64> {
        (0..SAMPLES_PER_INTERVAL).map(move |sample| if sample == 5 { dip } else { rest })
    }

    #[test]
    fn memory_reused_within_every_interval_is_kept() {
        let mut unused = UnusedFree::new(Some(100 * MIB));
        for _ in 0..10 {
            // 120 MiB free between calls, taken again once per interval.
            let samples = one_dip(101 * MIB, 220 * MIB);
            assert!(interval(&mut unused, samples).iter().all(|trim| !trim));
        }
    }

    #[test]
    fn memory_unused_through_an_interval_is_trimmed_at_its_end() {
        let mut unused = UnusedFree::new(Some(100 * MIB));
        // 120 MiB free, of which a call took 20 MiB: 100 MiB sat unused.
        let samples = one_dip(200 * MIB, 220 * MIB);
        let trims = interval(&mut unused, samples);
        assert_eq!(trims.iter().filter(|trim| **trim).count(), 1);
        assert!(trims[SAMPLES_PER_INTERVAL as usize - 1], "decided once the interval is over");
    }

    /// A trim returns the reused pages too: 10 MiB left unused is not worth faulting in the 110 MiB
    /// the interval's calls took again.
    #[test]
    fn memory_mostly_reused_is_kept_though_some_sat_unused() {
        let mut unused = UnusedFree::new(Some(100 * MIB));
        for _ in 0..3 {
            let samples = one_dip(110 * MIB, 220 * MIB);
            assert!(interval(&mut unused, samples).iter().all(|trim| !trim));
        }
        // Once the unused part outgrows what the calls take, it goes.
        let samples = one_dip(220 * MIB, 330 * MIB);
        assert!(interval(&mut unused, samples)[SAMPLES_PER_INTERVAL as usize - 1]);
    }

    #[test]
    fn a_little_unused_memory_is_not_worth_a_trim() {
        let mut unused = UnusedFree::new(Some(100 * MIB));
        let samples = (0..SAMPLES_PER_INTERVAL).map(|_| 100 * MIB + WORTH_TRIMMING - 1);
        assert!(interval(&mut unused, samples).iter().all(|trim| !trim));
    }

    /// What no trim returns can shrink (a mapping released); unused memory is counted above it.
    #[test]
    fn the_untrimmable_baseline_follows_the_process_down() {
        let mut unused = UnusedFree::new(Some(100 * MIB));
        let samples = (0..SAMPLES_PER_INTERVAL).map(|sample| if sample == 0 { 60 * MIB } else { 62 * MIB });
        assert!(interval(&mut unused, samples).iter().all(|trim| !trim), "2 MiB above the new baseline");
    }

    /// A block the allocator maps on its own (above glibc's largest mmap threshold, 32 MiB) is in
    /// use like any other, not free heap memory.
    #[test]
    fn blocks_mapped_on_their_own_count_as_in_use() {
        let _alone = crate::RESIDENT_MEMORY_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let before = resident_not_in_use().expect("statm and mallinfo2");
        let block = vec![1u8; 64 << 20];
        let during = resident_not_in_use().expect("statm and mallinfo2");
        assert!(during.abs_diff(before) < 8 << 20, "{} MiB then {} MiB resident unused", before >> 20, during >> 20);
        assert!(block.iter().step_by(4096).all(|byte| *byte == 1));
    }

    /// Threads of this process named as the trimmer's (`comm` keeps 15 bytes of the name).
    fn trimmer_threads() -> usize {
        let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim_end() == "switchyard-heap")
            .count()
    }

    #[test]
    fn the_trimmer_runs_on_a_thread_of_its_own_unless_its_interval_is_zero() {
        spawn_heap_trimmer(Duration::ZERO).expect("nothing to start");
        assert_eq!(trimmer_threads(), 0, "a zero interval starts no trimmer");
        // An hour: this test's trimmer never trims while the other tests run.
        spawn_heap_trimmer(Duration::from_secs(3600)).expect("a trimmer");
        // The thread names itself once it runs.
        let started = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            trimmer_threads() == 1
        });
        assert!(started, "{} trimmer threads", trimmer_threads());
    }

    /// 16 MiB freed in 64 KiB blocks (below the mmap threshold: heap memory) under a few blocks
    /// still held stay resident until a trim returns them.
    #[test]
    fn trimming_returns_freed_heap_pages() {
        let _alone = crate::RESIDENT_MEMORY_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let blocks: Vec<Vec<u8>> = (0..256).map(|i| vec![i as u8 | 1; 64 * 1024]).collect();
        let held: Vec<Vec<u8>> = blocks.iter().step_by(64).cloned().collect();
        let in_use = resident_not_in_use().expect("statm and mallinfo2");
        drop(blocks);
        let freed = resident_not_in_use().expect("statm and mallinfo2");
        assert!(freed >= in_use + (8 << 20), "freeing 16 MiB left {} MiB more resident unused", (freed - in_use) >> 20);
        let before = resident_bytes().expect("/proc/self/statm");
        assert!(trim(), "the freed blocks are free pages in the heap");
        let returned = before.saturating_sub(resident_bytes().expect("/proc/self/statm"));
        assert!(returned >= 8 << 20, "{returned} bytes returned of the 16 MiB freed");
        let trimmed = resident_not_in_use().expect("statm and mallinfo2");
        assert!(trimmed + (8 << 20) <= freed, "the trim left {} MiB resident unused", trimmed >> 20);
        assert!(held.iter().all(|block| block.len() == 64 * 1024));
    }
}
