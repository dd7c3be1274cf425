//! Which holder of an expert a call uses, and which holders to keep away from.
//!
//! [`Replicas`] lives as long as the client: it counts the (token, expert) assignments each worker
//! has in flight and remembers workers that failed lately. [`Choice`] is its snapshot for planning
//! one call: an expert's rows are spread over its holders, each row to the least busy one,
//! counting what the call itself has given each worker so far (ties broken by the call, so equal
//! workers share the calls); never to one this call already failed on, and to one that failed
//! lately only when no other holds the expert.
//!
//! Busy is counted in assignments, not requests: nearly every call sends a request to each worker
//! that holds an expert alone, so a worker holding only replicas would otherwise look the least
//! busy to every call and be given every replicated expert's rows. And rows are spread, not whole
//! experts sent to one holder, because the coordinator's plan (EPLB) counts on each replica
//! taking an even share: whole experts made the hot one land on whichever holder had the fewest
//! rows of its own, 2.2x its co-holders' share.

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
    /// Counts a request of `assignments` to `endpoint` in flight until the guard drops.
    pub fn start(&self, endpoint: &Endpoint, assignments: usize) -> InFlight<'_> {
        *lock(&self.in_flight).entry(endpoint.clone()).or_default() += assignments;
        InFlight { replicas: self, endpoint: endpoint.clone(), assignments }
    }

    /// `endpoint` failed: other holders are preferred for a while.
    pub fn suspect(&self, endpoint: &Endpoint) {
        self.suspect_at(endpoint, Instant::now());
    }

    /// The snapshot one call plans with; `excluded` are the workers this call already failed on.
    pub fn choice(&self, salt: u64, excluded: HashSet<Endpoint>) -> Choice {
        self.choice_at(salt, excluded, Instant::now())
    }

    fn suspect_at(&self, endpoint: &Endpoint, now: Instant) {
        lock(&self.failed_at).insert(endpoint.clone(), now);
    }

    fn choice_at(&self, salt: u64, excluded: HashSet<Endpoint>, now: Instant) -> Choice {
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
    assignments: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(count) = lock(&self.replicas.in_flight).get_mut(&self.endpoint) {
            *count = count.saturating_sub(self.assignments);
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
    /// Whether any of `holders` may be picked (not all are excluded).
    pub fn allows(&self, holders: &[Endpoint]) -> bool {
        holders.iter().any(|endpoint| !self.excluded.contains(endpoint))
    }

    /// Where a holder stands for this call: `None` if excluded, else (suspect, assignments in
    /// flight with this call's own, position after the call's salt rotated the list).
    fn rank(&self, holders: &[Endpoint], index: usize) -> Option<(bool, usize, usize)> {
        let endpoint = &holders[index];
        if self.excluded.contains(endpoint) {
            return None;
        }
        let count = holders.len();
        let rotated = (index + count - (self.salt as usize % count)) % count;
        Some((self.suspects.contains(endpoint), self.in_flight.get(endpoint).copied().unwrap_or(0), rotated))
    }

    /// The holder to send `assignments` to, all of them: not excluded; not suspect unless all the
    /// others are; then the fewest assignments in flight, this call's picks so far included; among
    /// equals the one the call's salt points at. `None`: every holder is excluded (or there is
    /// none).
    pub fn pick<'a>(&mut self, holders: &'a [Endpoint], assignments: usize) -> Option<&'a Endpoint> {
        let best = (0..holders.len()).filter_map(|index| Some((self.rank(holders, index)?, index))).min()?;
        let picked = &holders[best.1];
        *self.in_flight.entry(picked.clone()).or_default() += assignments;
        Some(picked)
    }

    /// Splits `rows` of one expert among `holders` as water fills vessels: each row goes to the
    /// holder with the fewest assignments in flight (this call's included), so that the call
    /// leaves them as even as its rows allow; among equals the salt decides. Excluded holders take
    /// none, suspect ones only when all the others are. Returns (holder index, rows) in holder
    /// order, only those given rows; empty when every holder is excluded.
    pub fn spread(&mut self, holders: &[Endpoint], rows: usize) -> Vec<(usize, usize)> {
        let ranked = || (0..holders.len()).filter_map(|index| Some((self.rank(holders, index)?, index)));
        let Some(healthiest) = ranked().map(|((suspect, ..), _)| suspect).min() else {
            return Vec::new();
        };
        // (in flight, rotated position, index) of the holders that may take rows, least busy first.
        let mut vessels: Vec<(usize, usize, usize)> = ranked()
            .filter(|((suspect, ..), _)| *suspect == healthiest)
            .map(|((_, in_flight, rotated), index)| (in_flight, rotated, index))
            .collect();
        vessels.sort_unstable();
        // Fill the least busy up to the next one's level while the rows last, then share the rest.
        let (mut filled, mut left) = (1, rows);
        while filled < vessels.len() {
            let step = (vessels[filled].0 - vessels[filled - 1].0) * filled;
            if step > left {
                break;
            }
            left -= step;
            filled += 1;
        }
        let level = vessels[filled - 1].0 + left / filled;
        let mut shares: Vec<(usize, usize)> = vessels[..filled]
            .iter()
            .enumerate()
            .map(|(position, (in_flight, _, index))| {
                (*index, level - in_flight + usize::from(position < left % filled))
            })
            .filter(|(_, share)| *share > 0)
            .collect();
        for (index, share) in &shares {
            *self.in_flight.entry(holders[*index].clone()).or_default() += share;
        }
        shares.sort_unstable();
        shares
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn endpoints(names: &[&str]) -> Vec<Endpoint> {
        names.iter().map(|name| Arc::from(*name)).collect()
    }

    fn pick(replicas: &Replicas, salt: u64, excluded: HashSet<Endpoint>, holders: &[Endpoint]) -> Option<String> {
        replicas.choice(salt, excluded).pick(holders, 1).map(|endpoint| endpoint.to_string())
    }

    #[test]
    fn the_least_busy_holder_is_picked_and_equals_take_turns_by_call() {
        let replicas = Replicas::default();
        let holders = endpoints(&["a", "b"]);
        let picks: HashSet<String> =
            (0..4).map(|salt| pick(&replicas, salt, HashSet::new(), &holders).expect("a holder")).collect();
        assert_eq!(picks, HashSet::from(["a".into(), "b".into()]), "idle equals share the calls");
        let _heavy = replicas.start(&holders[0], 5);
        let _light = replicas.start(&holders[1], 3);
        for salt in 0..4 {
            assert_eq!(pick(&replicas, salt, HashSet::new(), &holders).as_deref(), Some("b"), "fewer assignments");
        }
    }

    #[test]
    fn a_call_counts_what_it_gave_each_holder_before() {
        let replicas = Replicas::default();
        let holders = endpoints(&["a", "b"]);
        let _other_call = replicas.start(&holders[1], 6);
        let mut choice = replicas.choice(0, HashSet::new());
        let picks: Vec<&str> =
            [4, 4, 4, 4].iter().map(|rows| &**choice.pick(&holders, *rows).expect("a holder")).collect();
        assert_eq!(picks, ["a", "a", "b", "a"], "a's 4 + 4 passes the 6 b has in flight; then b's 6 + 4 passes a's 8");
    }

    #[test]
    fn rows_fill_the_least_busy_holders_up_to_the_next_ones_level() {
        let replicas = Replicas::default();
        let holders = endpoints(&["a", "b", "c"]);
        assert_eq!(replicas.choice(0, HashSet::new()).spread(&holders, 9), [(0, 3), (1, 3), (2, 3)], "idle: even");
        let _b = replicas.start(&holders[1], 4);
        let _c = replicas.start(&holders[2], 10);
        let mut choice = replicas.choice(0, HashSet::new());
        assert_eq!(choice.spread(&holders, 8), [(0, 6), (1, 2)], "a to b's 4, then both to 6, short of c's 10");
        assert_eq!(choice.spread(&holders, 8), [(0, 4), (1, 4)], "the call's own rows count: a and b up to c's 10");
        assert_eq!(choice.spread(&holders, 3), [(0, 1), (1, 1), (2, 1)]);
    }

    #[test]
    fn a_remainder_goes_where_the_salt_points() {
        let replicas = Replicas::default();
        let holders = endpoints(&["a", "b"]);
        assert_eq!(replicas.choice(0, HashSet::new()).spread(&holders, 3), [(0, 2), (1, 1)]);
        assert_eq!(replicas.choice(1, HashSet::new()).spread(&holders, 3), [(0, 1), (1, 2)]);
        assert_eq!(replicas.choice(1, HashSet::new()).spread(&holders, 1), [(1, 1)]);
        // Three holders, where turning the other way (or wrapping) would point elsewhere.
        let holders = endpoints(&["a", "b", "c"]);
        for salt in 0..7 {
            let pointed = salt as usize % 3;
            let rows = replicas.choice(salt, HashSet::new()).spread(&holders, 1);
            assert_eq!(rows, [(pointed, 1)], "salt {salt}");
            let picked = pick(&replicas, salt, HashSet::new(), &holders);
            assert_eq!(picked.as_deref(), Some(["a", "b", "c"][pointed]), "salt {salt}");
        }
    }

    #[test]
    fn rows_avoid_excluded_holders_and_suspects_while_others_are_there() {
        let replicas = Replicas::default();
        let holders = endpoints(&["a", "b", "c"]);
        replicas.suspect(&holders[1]);
        let _busy = replicas.start(&holders[2], 100);
        let excluded = HashSet::from([holders[0].clone()]);
        assert_eq!(replicas.choice(0, excluded.clone()).spread(&holders, 5), [(2, 5)], "busy beats failed");
        assert_eq!(replicas.choice(0, excluded.clone()).spread(&holders[..2], 5), [(1, 5)], "a suspect beats none");
        assert!(replicas.choice(0, excluded).spread(&holders[..1], 5).is_empty());
    }

    #[test]
    fn a_failed_holder_is_avoided_and_an_excluded_one_never_picked() {
        let replicas = Replicas::default();
        let holders = endpoints(&["a", "b"]);
        replicas.suspect(&holders[1]);
        let _busy = replicas.start(&holders[0], 1);
        assert_eq!(pick(&replicas, 1, HashSet::new(), &holders).as_deref(), Some("a"), "busy beats failed");
        assert_eq!(pick(&replicas, 1, HashSet::new(), &holders[1..]).as_deref(), Some("b"), "the only holder");
        let excluded = HashSet::from([holders[0].clone()]);
        assert_eq!(pick(&replicas, 0, excluded.clone(), &holders).as_deref(), Some("b"));
        assert_eq!(pick(&replicas, 0, excluded, &holders[..1]), None);
    }

    /// A failure is held against a worker for [`SUSPECT_FOR`], then forgotten.
    #[test]
    fn a_failed_holder_is_suspect_for_its_while_and_no_longer() {
        let replicas = Replicas::default();
        let holders = endpoints(&["a", "b"]);
        let failed = Instant::now();
        replicas.suspect_at(&holders[0], failed);
        let _busy = replicas.start(&holders[1], 1);
        let rows_at = |since: Duration| replicas.choice_at(0, HashSet::new(), failed + since).spread(&holders, 4);
        assert_eq!(rows_at(Duration::ZERO), [(1, 4)], "just failed: the busy holder takes every row");
        assert_eq!(rows_at(SUSPECT_FOR - Duration::from_millis(1)), [(1, 4)], "still suspect");
        assert_eq!(rows_at(SUSPECT_FOR), [(0, 3), (1, 1)], "forgiven: the idle holder takes its share");
        assert_eq!(rows_at(Duration::ZERO), [(0, 3), (1, 1)], "and forgotten, not suspect again");
    }

    #[test]
    fn a_request_stops_counting_when_its_guard_drops() {
        let replicas = Replicas::default();
        let holders = endpoints(&["a", "b"]);
        {
            let _first = replicas.start(&holders[0], 3);
            let _second = replicas.start(&holders[0], 2);
        }
        let picks: HashSet<String> =
            (0..4).map(|salt| pick(&replicas, salt, HashSet::new(), &holders).expect("a holder")).collect();
        assert_eq!(picks.len(), 2);
    }
}
