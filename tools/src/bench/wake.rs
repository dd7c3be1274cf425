//! How long one thread of this machine takes to wake another: a condvar ping-pong between two
//! threads. A call crosses threads and processes several times (runtime threads, a worker's compute
//! thread, the client's CPU pool), so where an idle core sleeps deeply (a virtual machine without
//! guest halt polling), this, more than the wire, sets the floor of a small call.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::spread::Spread;

/// Round trips of a wake-up between two threads (two wakes each), measured once per run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WakeFigure {
    pub round_trips: u32,
    pub p50_us: f64,
    pub p90_us: f64,
}

/// Ping-pongs a counter between this thread and another `round_trips` times, each side waiting on
/// a condvar for its turn; each round trip is two wakes. Blocking: run it off the async runtime.
pub fn measure(round_trips: u32) -> WakeFigure {
    let turn = Arc::new((Mutex::new(0u64), Condvar::new()));
    let last = 2 * u64::from(round_trips);
    let echo = {
        let turn = turn.clone();
        std::thread::spawn(move || {
            let (count, changed) = &*turn;
            let mut count = count.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            while *count < last {
                count =
                    changed.wait_while(count, |count| *count % 2 == 0).unwrap_or_else(|poisoned| poisoned.into_inner());
                *count += 1;
                changed.notify_one();
            }
        })
    };
    let (count, changed) = &*turn;
    let mut times = Vec::with_capacity(round_trips as usize);
    let mut guard = count.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..round_trips {
        let started = Instant::now();
        *guard += 1;
        changed.notify_one();
        guard = changed.wait_while(guard, |count| *count % 2 == 1).unwrap_or_else(|poisoned| poisoned.into_inner());
        times.push(started.elapsed());
    }
    drop(guard);
    let _ = echo.join();
    let spread = Spread::of(&times);
    WakeFigure { round_trips, p50_us: spread.p50_us, p90_us: spread.p90_us }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_round_trip_is_timed_and_the_quantiles_are_ordered() {
        let figure = measure(200);
        assert_eq!(figure.round_trips, 200);
        assert!(figure.p50_us > 0.0, "a wake takes time: {figure:?}");
        assert!(figure.p50_us <= figure.p90_us, "{figure:?}");
    }
}
