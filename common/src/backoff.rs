//! How long to wait before dialling a peer again: exponential from `first` up to `most`, each wait
//! stretched by a random share of itself (backon's jitter), so that the workers that lost the
//! coordinator together do not knock on it in step.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Waits before each retry, without end: `first`, then doubling up to `most`, each times a random
/// factor in [1, 2).
pub fn reconnect(first: Duration, most: Duration) -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default().with_min_delay(first).with_max_delay(most).with_jitter().without_max_times().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_each_with_jitter_below_twice_itself() {
        let (first, most) = (Duration::from_millis(100), Duration::from_millis(800));
        let waits: Vec<Duration> = reconnect(first, most).take(200).collect();
        assert_eq!(waits.len(), 200, "never gives up");
        let unjittered = [100, 200, 400, 800, 800, 800].map(Duration::from_millis);
        for (wait, base) in waits.iter().zip(unjittered) {
            assert!(*wait >= base && *wait < base * 2, "{wait:?} against {base:?}");
        }
        assert!(waits.iter().all(|wait| *wait < most * 2));
        let distinct: std::collections::BTreeSet<Duration> = waits[3..].iter().copied().collect();
        assert!(distinct.len() > 100, "jittered: {} distinct waits of 197", distinct.len());
    }
}
