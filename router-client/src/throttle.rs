//! Client-side adaptive throttling, as the Google SRE book's "Handling Overload" chapter has it.
//!
//! A worker whose expert queues are full refuses what it is sent, but a refusal still costs: the
//! client gated, packed and sent the rows, the worker received and read them, and with
//! [`crate::RefusalPolicy::Fail`] the call's parts admitted elsewhere are cancelled. Offered ten
//! times what the cluster computes, that cost takes the cores the experts need. So each client
//! counts, per worker over the last [`WINDOW`], the requests it sent and those accepted, and refuses
//! calls itself, before anything is packed or sent, with probability
//! `max(0, (requests − ratio · accepts) / (requests + 1))`. At `ratio` 2 a worker is still sent
//! twice what it accepts, so the client finds out at once when it has room again; the calls a
//! client refuses itself cost nothing anywhere. Where the worker's experts have other holders, a
//! refused call's rows for it go to them instead (`client/plan.rs`'s `hold_back_throttled`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock;
use crate::transport::Endpoint;

/// How far back requests and accepts count.
pub const WINDOW: Duration = Duration::from_secs(10);
/// The window slides in steps of `WINDOW / BUCKETS`.
const BUCKETS: usize = 20;
/// Fewer requests than this in the window say too little to refuse calls on (one refused request
/// would otherwise refuse every other call).
const MIN_REQUESTS: u64 = 16;

/// What became of one request a worker was sent, as throttling counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The worker answered it.
    Accepted,
    /// The worker refused it for want of room (a full expert queue, `RESOURCE_EXHAUSTED`).
    Refused,
}

/// Why the client refused a call to `endpoint` itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttled {
    /// Requests to the worker in the window, the ones the client refused itself included.
    pub requests: u64,
    /// Requests the worker accepted in the window.
    pub accepts: u64,
}

/// Per-worker request and accept counts over a sliding window; shared by every call of a client.
#[derive(Debug)]
pub struct Throttle {
    ratio: f64,
    windows: Mutex<HashMap<Endpoint, Window>>,
}

impl Throttle {
    /// Throttling that lets each worker be sent `ratio` requests per request it accepted.
    pub fn new(ratio: f64) -> Self {
        Self { ratio, windows: Mutex::new(HashMap::new()) }
    }

    /// Whether a call may send to `endpoint` now; a refusal counts as a request the worker did not
    /// accept, so the refusal rate follows the worker's.
    pub fn admit(&self, endpoint: &Endpoint) -> Result<(), Throttled> {
        self.admit_at(endpoint, Instant::now())
    }

    /// Counts what `endpoint` made of a request.
    pub fn record(&self, endpoint: &Endpoint, verdict: Verdict) {
        self.record_at(endpoint, verdict, Instant::now());
    }

    fn admit_at(&self, endpoint: &Endpoint, now: Instant) -> Result<(), Throttled> {
        let mut windows = lock(&self.windows);
        let Some(window) = windows.get_mut(endpoint) else { return Ok(()) };
        let (requests, accepts) = window.totals(now);
        let excess = requests as f64 - self.ratio * accepts as f64;
        if requests < MIN_REQUESTS || excess <= 0.0 {
            window.owed = 0.0;
            return Ok(());
        }
        // Refusals are spread evenly at the refusal probability (error diffusion), not drawn: the
        // share is exact over any run of calls, and tests need no seeded generator.
        window.owed += excess / (requests as f64 + 1.0);
        if window.owed < 1.0 {
            return Ok(());
        }
        window.owed -= 1.0;
        window.count(now, Verdict::Refused);
        Err(Throttled { requests: requests + 1, accepts })
    }

    fn record_at(&self, endpoint: &Endpoint, verdict: Verdict, now: Instant) {
        lock(&self.windows).entry(endpoint.clone()).or_insert_with(|| Window::new(now)).count(now, verdict);
    }
}

/// One worker's counts: a ring of buckets, the newest starting at `newest_start`.
#[derive(Debug)]
struct Window {
    buckets: [(u64, u64); BUCKETS],
    newest: usize,
    newest_start: Instant,
    /// Refusal probability accumulated since the last refusal.
    owed: f64,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self { buckets: [(0, 0); BUCKETS], newest: 0, newest_start: now, owed: 0.0 }
    }

    /// Moves the window up to `now`, emptying the buckets that fell out of it.
    fn slide(&mut self, now: Instant) {
        let step = WINDOW / BUCKETS as u32;
        let passed = (now.saturating_duration_since(self.newest_start).as_nanos() / step.as_nanos()) as usize;
        for _ in 0..passed.min(BUCKETS) {
            self.newest = (self.newest + 1) % BUCKETS;
            self.buckets[self.newest] = (0, 0);
        }
        self.newest_start += step * passed.min(u32::MAX as usize) as u32;
    }

    fn count(&mut self, now: Instant, verdict: Verdict) {
        self.slide(now);
        let (requests, accepts) = &mut self.buckets[self.newest];
        *requests += 1;
        if verdict == Verdict::Accepted {
            *accepts += 1;
        }
    }

    fn totals(&mut self, now: Instant) -> (u64, u64) {
        self.slide(now);
        self.buckets.iter().fold((0, 0), |(requests, accepts), (r, a)| (requests + r, accepts + a))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn refusals(throttle: &Throttle, endpoint: &Endpoint, calls: usize, now: Instant) -> usize {
        (0..calls).filter(|_| throttle.admit_at(endpoint, now).is_err()).count()
    }

    #[test]
    fn a_worker_accepting_its_share_is_never_throttled() {
        let (throttle, worker, now) = (Throttle::new(2.0), Endpoint::from("w"), Instant::now());
        assert_eq!(refusals(&throttle, &worker, 100, now), 0, "a worker never heard from");
        for _ in 0..100 {
            throttle.record_at(&worker, Verdict::Accepted, now);
            throttle.record_at(&worker, Verdict::Refused, now);
        }
        assert_eq!(refusals(&throttle, &worker, 100, now), 0, "half refused is within a ratio of 2");
    }

    #[test]
    fn a_worker_refusing_most_is_sent_about_ratio_times_what_it_accepts() {
        let (throttle, worker, now) = (Throttle::new(2.0), Endpoint::from("w"), Instant::now());
        // 10x overload: one request in ten accepted.
        for round in 0..1000 {
            let verdict = if round % 10 == 0 { Verdict::Accepted } else { Verdict::Refused };
            throttle.record_at(&worker, verdict, now);
        }
        // p = (1000 − 2·100) / 1001 ≈ 0.8 at first, rising as the client's own refusals count
        // (no answers come back while it refuses them all here).
        let refused = refusals(&throttle, &worker, 1000, now);
        assert!((800..=900).contains(&refused), "{refused} of 1000 calls refused");
        let error = throttle.admit_at(&worker, now).err().or_else(|| throttle.admit_at(&worker, now).err());
        let Throttled { requests, accepts } = error.expect("still refusing");
        assert_eq!(accepts, 100);
        assert!(requests > 1000, "the client's own refusals count as requests: {requests}");
        assert_eq!(refusals(&throttle, &Endpoint::from("other"), 100, now), 0, "counts are per worker");
    }

    #[test]
    fn counts_leave_the_window_and_throttling_ends() {
        let (throttle, worker, start) = (Throttle::new(2.0), Endpoint::from("w"), Instant::now());
        for _ in 0..100 {
            throttle.record_at(&worker, Verdict::Refused, start);
        }
        assert!(refusals(&throttle, &worker, 10, start) >= 9);
        let half_later = start + WINDOW / 2;
        assert!(refusals(&throttle, &worker, 10, half_later) >= 9, "still in the window");
        assert_eq!(refusals(&throttle, &worker, 10, half_later + WINDOW + WINDOW / 10), 0, "slid out");
        let shared: Arc<Throttle> = Arc::new(Throttle::new(2.0));
        for _ in 0..MIN_REQUESTS {
            shared.record(&worker, Verdict::Refused);
        }
        assert!(shared.admit(&worker).is_err() || shared.admit(&worker).is_err(), "p ≈ 1 refuses");
    }

    #[test]
    fn counts_stay_for_the_whole_window_and_leave_when_it_has_passed() {
        let (throttle, worker, start) = (Throttle::new(2.0), Endpoint::from("w"), Instant::now());
        for _ in 0..100 {
            throttle.record_at(&worker, Verdict::Refused, start);
        }
        // The window slides in steps: the start's bucket is emptied by the BUCKETS-th step, not
        // one before (a ring any shorter would forget counts early).
        let step = WINDOW / BUCKETS as u32;
        let last_moment_in = start + WINDOW - step / 2;
        assert!(refusals(&throttle, &worker, 10, last_moment_in) >= 9, "still in the window");
        assert_eq!(refusals(&throttle, &worker, 10, start + WINDOW), 0, "the window has passed");
    }

    #[test]
    fn a_few_refusals_are_not_enough_to_throttle() {
        let (throttle, worker, now) = (Throttle::new(2.0), Endpoint::from("w"), Instant::now());
        for _ in 0..MIN_REQUESTS - 1 {
            throttle.record_at(&worker, Verdict::Refused, now);
        }
        assert_eq!(refusals(&throttle, &worker, 10, now), 0);
        throttle.record_at(&worker, Verdict::Refused, now);
        // At the minimum p = 16/17: owed 16/17 after the first call, past 1 after the second,
        // which is refused and counted as a request.
        assert_eq!(throttle.admit_at(&worker, now), Ok(()));
        assert_eq!(throttle.admit_at(&worker, now), Err(Throttled { requests: 17, accepts: 0 }));
    }

    #[test]
    fn a_refusal_is_due_once_the_owed_probability_reaches_one() {
        let (throttle, worker, now) = (Throttle::new(2.0), Endpoint::from("w"), Instant::now());
        // 17 requests, 4 accepted: p = (17 − 2·4) / 18 = 1/2 exactly, so two calls owe exactly one.
        for round in 0..17 {
            let verdict = if round < 4 { Verdict::Accepted } else { Verdict::Refused };
            throttle.record_at(&worker, verdict, now);
        }
        assert_eq!(throttle.admit_at(&worker, now), Ok(()), "half a refusal owed");
        assert_eq!(throttle.admit_at(&worker, now), Err(Throttled { requests: 18, accepts: 4 }), "one owed");
    }
}
