//! One large piece of CPU work split over threads scoped to it.

/// Chunks of one large piece of work per thread taking part ([`in_turns`]): a thread that starts
/// late or shares its core takes fewer of them. On the 2-core VM a call's second thread often ran
/// behind: Mixtral's 1024-token router split in equal halves took ~1.0 ms or ~1.8 ms, one thread
/// alone 1.6-1.8 ms (`router-client/examples/gate_product.rs` and the bench).
pub const CHUNKS_PER_THREAD: usize = 4;

/// How many chunks work for `threads` threads is cut into: [`CHUNKS_PER_THREAD`] each for threads
/// to take in turns ([`in_turns`]), one for a thread alone.
pub fn chunks_for(threads: usize) -> usize {
    if threads > 1 { threads * CHUNKS_PER_THREAD } else { 1 }
}

/// Runs `work` on every one of `chunks` on up to `threads` threads scoped to this call (the
/// calling thread among them, the others named `name`), each taking the next chunk as soon as it
/// is done with one. Where equal parts, one per thread, wait for the slowest thread, here a thread
/// that starts late, or finds its core busy, takes fewer chunks and the others more: with chunks
/// several times as many as threads ([`CHUNKS_PER_THREAD`]), the work ends about when the threads
/// that could run are through it, never much later than one thread alone would be. For work far
/// larger than starting a thread costs (~50-100 µs on a small VM). A thread that cannot start is
/// the system's failure: it panics, for the caller's panic guard to answer.
pub fn in_turns<T: Send>(name: &str, threads: usize, chunks: impl Iterator<Item = T> + Send, work: impl Fn(T) + Sync) {
    let chunks = std::sync::Mutex::new(chunks);
    // The lock guards only taking the next chunk: a panic in `work` leaves the iterator whole.
    let next = || chunks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).next();
    let take_turns = || {
        while let Some(chunk) = next() {
            work(chunk);
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn_scoped(scope, take_turns)
                .expect("a thread for a share of the work starts");
        }
        take_turns();
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[test]
    fn every_chunk_runs_once_and_a_thread_that_is_held_up_takes_fewer() {
        let ran = Mutex::new(Vec::new());
        let by_caller = AtomicUsize::new(0);
        let held_up = AtomicBool::new(false);
        in_turns("test-turns", 2, 0..40, |chunk| {
            let helper = std::thread::current().name() == Some("test-turns");
            // The helper is held up on its first chunk, as by a busy core, until the caller has
            // run 30 (which waits for the helper to have started), or for 10 s should the caller
            // stop short of that; equal parts would give it 20.
            if helper && !held_up.swap(true, Ordering::SeqCst) {
                let started = std::time::Instant::now();
                while by_caller.load(Ordering::SeqCst) < 30 && started.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            if !helper {
                while !held_up.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                by_caller.fetch_add(1, Ordering::SeqCst);
            }
            ran.lock().expect("not poisoned").push((chunk, helper));
        });
        let ran = ran.into_inner().expect("not poisoned");
        let mut chunks: Vec<u32> = ran.iter().map(|(chunk, _)| *chunk).collect();
        chunks.sort();
        assert_eq!(chunks, (0..40).collect::<Vec<_>>());
        let by_helper = ran.iter().filter(|(_, helper)| *helper).count();
        assert!((1..=10).contains(&by_helper), "the held-up helper ran {by_helper} of 40 chunks");
    }

    #[test]
    fn threads_take_four_chunks_each_and_a_thread_alone_one() {
        assert_eq!([0, 1, 2, 8].map(chunks_for), [1, 1, 8, 32]);
    }

    #[test]
    fn one_thread_or_none_leaves_every_chunk_to_the_caller() {
        let caller = std::thread::current().id();
        for threads in [0, 1] {
            let ran = Mutex::new(0);
            in_turns("test-alone", threads, 0..5, |_| {
                assert_eq!(std::thread::current().id(), caller);
                *ran.lock().expect("not poisoned") += 1;
            });
            assert_eq!(ran.into_inner().expect("not poisoned"), 5, "{threads} threads");
        }
    }
}
