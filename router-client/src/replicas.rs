//! Which holder of an expert a call uses, and which holders to keep away from.
//!
//! [`Replicas`] lives as long as the client: it counts each worker's requests in flight and
//! remembers workers that failed lately. [`Choice`] is its snapshot for planning one call: per
//! expert the least busy holder (ties broken by the call, so equal workers share the calls), never
//! one this call already failed on, and one that failed lately only when no other holds the expert.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock;
use crate::transport::Endpoint;

/// How long a worker that failed is avoided while another holder is there.
const SUSPECT_FOR: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct Replicas {
    in_flight: Mutex<HashMap<Endpoint, usize>>,
    failed_at: Mutex<HashMap<Endpoint, Instant>>,
}

impl Replicas {
    /// Counts a request to `endpoint` in flight until the guard drops.
    pub fn start(&self, endpoint: &Endpoint) -> InFlight<'_> {
        *lock(&self.in_flight).entry(endpoint.clone()).or_default() += 1;
        InFlight { replicas: self, endpoint: endpoint.clone() }
    }

    /// `endpoint` failed: other holders are preferred for a while.
    pub fn suspect(&self, endpoint: &Endpoint) {
        lock(&self.failed_at).insert(endpoint.clone(), Instant::now());
    }

    /// The snapshot one call plans with; `excluded` are the workers this call already failed on.
    pub fn choice(&self, salt: u64, excluded: HashSet<Endpoint>) -> Choice {
        let now = Instant::now();
        let mut failed_at = lock(&self.failed_at);
        failed_at.retain(|_, at| now.duration_since(*at) < SUSPECT_FOR);
        Choice {
            in_flight: lock(&self.in_flight).clone(),
            suspects: failed_at.keys().cloned().collect(),
            excluded,
            salt,
        }
    }
}

/// One request in flight; counted down when dropped (answered, failed or abandoned).
#[derive(Debug)]
pub struct InFlight<'a> {
    replicas: &'a Replicas,
    endpoint: Endpoint,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(count) = lock(&self.replicas.in_flight).get_mut(&self.endpoint) {
            *count = count.saturating_sub(1);
        }
    }
}

/// How one call picks among an expert's holders.
#[derive(Debug, Clone, Default)]
pub struct Choice {
    in_flight: HashMap<Endpoint, usize>,
    suspects: HashSet<Endpoint>,
    pub excluded: HashSet<Endpoint>,
    salt: u64,
}

impl Choice {
    /// The holder to send to: not excluded; not suspect unless all the others are; then the
    /// fewest requests in flight; among equals the one the call's salt points at. `None`: every
    /// holder is excluded (or there is none).
    pub fn pick<'a>(&self, holders: &'a [Endpoint]) -> Option<&'a Endpoint> {
        let count = holders.len().max(1);
        holders
            .iter()
            .enumerate()
            .filter(|(_, endpoint)| !self.excluded.contains(*endpoint))
            .min_by_key(|(index, endpoint)| {
                let rotated = (index + count - (self.salt as usize % count)) % count;
                (self.suspects.contains(*endpoint), self.in_flight.get(*endpoint).copied().unwrap_or(0), rotated)
            })
            .map(|(_, endpoint)| endpoint)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn endpoints(names: &[&str]) -> Vec<Endpoint> {
        names.iter().map(|name| Arc::from(*name)).collect()
    }

    #[test]
    fn the_least_busy_holder_is_picked_and_equals_take_turns_by_call() {
        let replicas = Replicas::default();
        let holders = endpoints(&["a", "b"]);
        let picks: HashSet<&str> =
            (0..4).map(|salt| &**replicas.choice(salt, HashSet::new()).pick(&holders).expect("a holder")).collect();
        assert_eq!(picks, HashSet::from(["a", "b"]), "idle equals share the calls");
        let _busy = replicas.start(&holders[0]);
        for salt in 0..4 {
            assert_eq!(&**replicas.choice(salt, HashSet::new()).pick(&holders).expect("a holder"), "b");
        }
    }

    #[test]
    fn a_failed_holder_is_avoided_and_an_excluded_one_never_picked() {
        let replicas = Replicas::default();
        let holders = endpoints(&["a", "b"]);
        replicas.suspect(&holders[1]);
        let _busy = replicas.start(&holders[0]);
        assert_eq!(&**replicas.choice(1, HashSet::new()).pick(&holders).expect("a holder"), "a", "busy beats failed");
        assert_eq!(&**replicas.choice(1, HashSet::new()).pick(&holders[1..]).expect("the only holder"), "b");
        let excluded = HashSet::from([holders[0].clone()]);
        assert_eq!(&**replicas.choice(0, excluded.clone()).pick(&holders).expect("a holder"), "b");
        assert_eq!(replicas.choice(0, excluded).pick(&holders[..1]), None);
    }

    #[test]
    fn a_request_stops_counting_when_its_guard_drops() {
        let replicas = Replicas::default();
        let holders = endpoints(&["a", "b"]);
        {
            let _first = replicas.start(&holders[0]);
            let _second = replicas.start(&holders[0]);
        }
        let picks: HashSet<&str> =
            (0..4).map(|salt| &**replicas.choice(salt, HashSet::new()).pick(&holders).expect("a holder")).collect();
        assert_eq!(picks.len(), 2);
    }
}
