//! The client's CPU work (gate, routing, packing, decode, combine) runs on a small pool of its own
//! threads, never on the async runtime's: a large call's hundreds of milliseconds of arithmetic
//! would otherwise stall every other task of the process that embeds the client.
//!
//! Idle threads block on the job queue at once. A work-stealing pool (rayon) spins and yields for a
//! while after each job instead: with a few jobs per call, that kept two threads busy between calls
//! and delayed the threads the call was waiting for (the runtime's, a local worker's) whenever cores
//! are few.

use std::panic::{AssertUnwindSafe, catch_unwind};

use futures::future::Either;
use tokio::sync::oneshot;

use crate::error::ClientError;

/// Threads of a client's pool unless its options say: the machine's cores, at most 8 (one call's
/// work is a few large products and copies; more threads only wait).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from).clamp(1, 8)
}

type Job = Box<dyn FnOnce() + Send>;

/// The pool's threads end once every clone of it is dropped and the jobs queued before are done.
#[derive(Debug, Clone)]
pub struct CpuPool {
    jobs: crossbeam_channel::Sender<Job>,
}

impl CpuPool {
    pub fn new(threads: usize) -> Result<Self, ClientError> {
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        for index in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("switchyard-client-cpu-{index}"))
                .spawn(move || {
                    for job in queue {
                        job();
                    }
                })
                .map_err(|error| ClientError::Internal { reason: format!("starting the CPU pool: {error}") })?;
        }
        Ok(Self { jobs })
    }

    /// Runs `work` on the pool and waits for it without holding an async worker thread. A panic
    /// in `work` comes back as an error; if the caller stops waiting, `work` still runs to its end
    /// on data it owns.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ClientError> {
        self.spawn(work).await
    }

    /// Starts `work` now; the returned future yields its result.
    pub fn spawn<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> impl Future<Output = Result<T, ClientError>> + Send + 'static {
        let (done, result) = oneshot::channel();
        // The pool's threads live as long as a sender does, and this is one: the send cannot fail.
        let _ = self.jobs.send(Box::new(move || {
            let _ = done.send(catch_unwind(AssertUnwindSafe(work)));
        }));
        async move {
            match result.await {
                Ok(outcome) => caught(outcome),
                Err(_) => Err(ClientError::Internal { reason: "the client's CPU pool dropped a job".to_owned() }),
            }
        }
    }

    /// [`CpuPool::run`] for work of about `units` values touched (or multiply-adds over 8): at most
    /// [`INLINE_WORK`] of them, it runs here and now instead.
    pub async fn run_sized<T: Send + 'static>(
        &self,
        units: usize,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ClientError> {
        self.spawn_sized(units, work).await
    }

    /// [`CpuPool::spawn`] for work of about `units` (as [`CpuPool::run_sized`]); small work is done
    /// before this returns.
    pub fn spawn_sized<T: Send + 'static>(
        &self,
        units: usize,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> impl Future<Output = Result<T, ClientError>> + Send + 'static {
        if units <= INLINE_WORK {
            return Either::Left(std::future::ready(caught(catch_unwind(AssertUnwindSafe(work)))));
        }
        Either::Right(self.spawn(work))
    }
}

/// Work this small (values touched, or multiply-adds over 8) runs on the calling task: a few
/// microseconds, where handing it to a pool thread costs that thread's wake-up (~0.1-0.2 ms on the
/// 2-core VM this was measured on, whose idle cores halt) and the caller's.
pub const INLINE_WORK: usize = 1 << 15;

pub use switchyard_common::scoped_threads::{CHUNKS_PER_THREAD, chunks_for};

/// [`switchyard_common::scoped_threads::in_turns`] for one large call's product, routing, encode
/// or sum, in chunks of at most [`CHUNKS_PER_THREAD`] per thread for up to the client's CPU
/// threads. A thread that cannot start fails the call through the pool ([`ClientError::Internal`]).
pub fn in_turns<T: Send>(threads: usize, chunks: impl Iterator<Item = T> + Send, work: impl Fn(T) + Sync) {
    switchyard_common::scoped_threads::in_turns("switchyard-client-share", threads, chunks, work);
}

/// A job's outcome, its panic as an error.
fn caught<T>(outcome: std::thread::Result<T>) -> Result<T, ClientError> {
    outcome.map_err(|panic| {
        let reason = switchyard_common::panic::message(&*panic, "a panic");
        ClientError::Internal { reason: format!("the client's CPU work failed: {reason}") }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_off_the_runtime_and_a_panic_comes_back_as_an_error() {
        let pool = CpuPool::new(1).expect("pool");
        let caller = std::thread::current().id();
        let worker = pool.run(|| std::thread::current().id()).await.expect("runs");
        assert_ne!(worker, caller);
        let error = pool.run(|| -> u32 { panic!("boom") }).await.unwrap_err();
        assert_eq!(error.to_string(), "client: the client's CPU work failed: boom");
        assert_eq!(pool.run(|| 7).await.expect("the pool survives"), 7);
    }

    #[tokio::test]
    async fn small_work_runs_on_the_caller_and_large_work_on_the_pool() {
        let pool = CpuPool::new(1).expect("pool");
        let caller = std::thread::current().id();
        let small = pool.run_sized(INLINE_WORK, || std::thread::current().id()).await.expect("runs");
        assert_eq!(small, caller);
        let large = pool.run_sized(INLINE_WORK + 1, || std::thread::current().id()).await.expect("runs");
        assert_ne!(large, caller);
        let error = pool.run_sized(1, || -> u32 { panic!("small boom") }).await.unwrap_err();
        assert_eq!(error.to_string(), "client: the client's CPU work failed: small boom");
    }
}
