//! Wall-clock timestamps that cross process boundaries (the monotonic clock does not).

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch; 0 if the clock is set before 1970.
pub fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_nanos().min(u128::from(u64::MAX)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timestamp_is_the_wall_clock_s_nanoseconds_since_1970() {
        let nanos = |time: SystemTime| time.duration_since(UNIX_EPOCH).expect("after 1970").as_nanos() as u64;
        let before = nanos(SystemTime::now());
        let stamp = unix_nanos();
        assert!((before..=nanos(SystemTime::now())).contains(&stamp), "{stamp} ns not between the readings around it");
    }
}
