//! The CPU time a point's calls cost: what the bench's processes (this one, the coordinator and
//! the workers) spent on a CPU, to the nanosecond. A call of a few tokens costs more CPU distributed
//! than in-process beyond its wall time: the system calls of its sockets and the wakes of the
//! threads each end parks, on cores that other work then lacks. `/proc/stat`'s clock ticks (10 ms)
//! are too coarse for calls of a millisecond.

use std::path::Path;
use std::time::Duration;

use switchyard_experts::peak::process_cpu_time;

/// The CPU time so far of this process (its CPU clock) and of others (their threads' scheduler
/// statistics, `/proc/PID/task/TID/schedstat`, whose first field is the thread's time on a CPU,
/// brought up to date whenever the thread stops running: the cluster's threads wait between
/// calls, when they are read). A thread of another process that ends between two readings takes
/// its time with it.
#[derive(Debug, Clone, Copy)]
pub struct CpuReading {
    own: Duration,
    /// None where a process cannot be read (not Linux, or a process gone).
    others: Option<Duration>,
}

impl CpuReading {
    /// Before a span: the others first, this process's clock last, so that reading the others'
    /// threads (a file each) is not counted in the span.
    pub fn before(others: &[u32]) -> Self {
        let others = on_cpu(others);
        Self { own: process_cpu_time(), others }
    }

    /// After a span: this process's clock first.
    pub fn after(others: &[u32]) -> Self {
        let own = process_cpu_time();
        Self { own, others: on_cpu(others) }
    }
}

/// The time on a CPU so far of every thread of these (other) processes.
fn on_cpu(processes: &[u32]) -> Option<Duration> {
    processes.iter().try_fold(Duration::ZERO, |total, pid| Some(total + process_on_cpu(*pid)?))
}

fn process_on_cpu(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("task")).ok()?;
    let nanos = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|schedstat| on_cpu_nanos(&schedstat))
        .sum();
    Some(Duration::from_nanos(nanos))
}

/// `schedstat`'s first field: nanoseconds on a CPU (then waiting to run, and time slices).
fn on_cpu_nanos(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// The CPU time of a point's calls, per call, in microseconds: distributed and in-process, each
/// over the same processes (the in-process calls' includes the idle cluster's heartbeats).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CpuPerCall {
    pub distributed_us: f64,
    pub in_process_us: f64,
}

/// CPU time over spans: each span's growth between two [`CpuReading`]s, added up; none once a reading
/// failed.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSpent {
    total: Duration,
    unread: bool,
}

impl CpuSpent {
    /// Adds the span between two readings.
    pub fn add(&mut self, before: CpuReading, after: CpuReading) {
        match (before.others, after.others) {
            (Some(others_before), Some(others_after)) => {
                self.total += after.own.saturating_sub(before.own) + others_after.saturating_sub(others_before);
            }
            _ => self.unread = true,
        }
    }

    /// The time per call over `calls` calls, in microseconds.
    pub fn per_call_us(self, calls: u64) -> Option<f64> {
        (!self.unread && calls > 0).then(|| self.total.as_secs_f64() * 1e6 / calls as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_schedstat_field_is_the_time_on_a_cpu() {
        assert_eq!(on_cpu_nanos("123456789 4000 17\n"), Some(123_456_789));
        assert_eq!(on_cpu_nanos(""), None);
        assert_eq!(on_cpu_nanos("ticks 1 2\n"), None);
    }

    #[test]
    fn spans_add_up_and_one_unread_span_spoils_the_figure() {
        let at = |own: u64, others: Option<u64>| CpuReading {
            own: Duration::from_micros(own),
            others: others.map(Duration::from_micros),
        };
        let mut spent = CpuSpent::default();
        spent.add(at(100, Some(50)), at(300, Some(150)));
        spent.add(at(1000, Some(0)), at(1400, Some(100)));
        assert_eq!(spent.per_call_us(4), Some(200.0));
        assert_eq!(spent.per_call_us(0), None);
        spent.add(at(10, Some(0)), at(20, None));
        assert_eq!(spent.per_call_us(4), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_counts_what_it_spins() {
        // The wall clock brackets the readings: the process, other tests' threads included, can
        // have spent about every core's time between them at most (on this VM the scheduler's
        // clock ran 1-2% ahead of the wall clock with both cores busy), not twice as much.
        let started = std::time::Instant::now();
        let before = CpuReading::before(&[]);
        let mut spin = 0u64;
        while CpuReading::after(&[]).own - before.own < Duration::from_millis(20) {
            assert!(started.elapsed() < Duration::from_secs(10), "20 ms of spinning never counted");
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        let mut spent = CpuSpent::default();
        spent.add(before, CpuReading::after(&[]));
        let wall_us = started.elapsed().as_secs_f64() * 1e6;
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let spent_us = spent.per_call_us(1).expect("read");
        assert!((20e3..=wall_us * cores * 1.25).contains(&spent_us), "{spent_us} µs on {cores} cores in {wall_us} µs");
        assert!(CpuReading::after(&[u32::MAX]).others.is_none(), "no such process");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn another_process_is_read_from_its_threads() {
        let mut busy = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh");
        std::thread::sleep(Duration::from_millis(300));
        let spent = on_cpu(&[busy.id()]);
        let _ = busy.kill();
        let _ = busy.wait();
        let spent = spent.expect("/proc/PID/task");
        // Alone on a core for most of 300 ms, with a test beside it at most.
        assert!((Duration::from_millis(30)..=Duration::from_millis(400)).contains(&spent), "{spent:?}");
    }
}
