//! Load-aware placement (DeepSeek's EPLB idea): measure what each expert is offered, give the
//! hottest experts redundant replicas, and weigh each replica by its share of the traffic, so that
//! placement evens out the load each worker carries rather than the parameters it holds.
//!
//! [`Traffic`] turns the cumulative per-expert counters workers send with their heartbeats into
//! tokens per second over a sliding (exponentially decaying) window. A [`Balancer`] is the policy
//! over those rates; [`Eplb`] is the one shipped.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use switchyard_model::ExpertId;

use crate::placement::WorkerId;

/// Tokens per second each expert is offered (admitted and refused), over a decaying window.
#[derive(Debug)]
pub struct Traffic {
    window: Duration,
    /// The last cumulative count each worker reported per expert.
    last: HashMap<WorkerId, HashMap<ExpertId, u64>>,
    /// Tokens offered since the last [`Traffic::rates`].
    pending: BTreeMap<ExpertId, u64>,
    rates: BTreeMap<ExpertId, f64>,
    since: Instant,
}

impl Traffic {
    pub fn new(window: Duration) -> Self {
        Self { window, last: HashMap::new(), pending: BTreeMap::new(), rates: BTreeMap::new(), since: Instant::now() }
    }

    /// A worker's cumulative counts of tokens offered to each of its experts; a count lower than
    /// the last one (a restarted worker) counts from zero.
    pub fn record(&mut self, worker: &WorkerId, offered: &[(ExpertId, u64)]) {
        let last_of_worker = self.last.entry(worker.clone()).or_default();
        for (expert, offered) in offered {
            let last = last_of_worker.insert(*expert, *offered).unwrap_or(0);
            let new = if *offered >= last { offered - last } else { *offered };
            // Counts come from the network: a hostile or broken worker's must not wrap the sum.
            let pending = self.pending.entry(*expert).or_default();
            *pending = pending.saturating_add(new);
        }
    }

    pub fn forget(&mut self, worker: &WorkerId) {
        self.last.remove(worker);
    }

    /// Folds what arrived since the last call into the rates and returns them.
    pub fn rates(&mut self, now: Instant) -> &BTreeMap<ExpertId, f64> {
        let elapsed = now.duration_since(self.since).as_secs_f64();
        if elapsed <= 0.0 {
            return &self.rates;
        }
        // The weight of the older rate: a window's worth of time leaves 1/e of it.
        let keep = (-elapsed / self.window.as_secs_f64().max(1e-3)).exp();
        let experts: Vec<ExpertId> = self.rates.keys().chain(self.pending.keys()).copied().collect();
        for expert in experts {
            let recent = self.pending.get(&expert).copied().unwrap_or(0) as f64 / elapsed;
            let rate = self.rates.entry(expert).or_default();
            *rate = keep * *rate + (1.0 - keep) * recent;
        }
        self.pending.clear();
        self.since = now;
        &self.rates
    }
}

/// How many holders each expert gets, and what one replica of it weighs (tokens per second it
/// takes, once the traffic is shared among its replicas).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Balance {
    pub replicas: BTreeMap<ExpertId, usize>,
    pub per_replica_rate: BTreeMap<ExpertId, f64>,
}

impl Balance {
    /// max / mean of the load per worker if `holders` serve the experts: 1 is perfect balance.
    pub fn imbalance<'a>(&self, holders: impl Iterator<Item = (&'a ExpertId, &'a Vec<WorkerId>)>) -> f64 {
        let mut per_worker: HashMap<&WorkerId, f64> = HashMap::new();
        for (expert, owners) in holders {
            let rate = self.per_replica_rate.get(expert).copied().unwrap_or(0.0);
            for owner in owners {
                *per_worker.entry(owner).or_default() += rate;
            }
        }
        let mean = per_worker.values().sum::<f64>() / per_worker.len().max(1) as f64;
        let max = per_worker.values().copied().fold(0.0, f64::max);
        if mean > 0.0 { max / mean } else { 1.0 }
    }
}

/// The policy over measured rates.
pub trait Balancer: Send + Sync + fmt::Debug {
    /// At least `base[expert]` replicas per expert (1 if absent), and at most one per worker.
    fn balance(&self, rates: &BTreeMap<ExpertId, f64>, base: &BTreeMap<ExpertId, usize>, workers: usize) -> Balance;
}

/// EPLB: `redundant` extra replicas, each given in turn to the expert with the most traffic per
/// replica.
#[derive(Debug, Clone, Copy)]
pub struct Eplb {
    pub redundant: usize,
}

impl Balancer for Eplb {
    fn balance(&self, rates: &BTreeMap<ExpertId, f64>, base: &BTreeMap<ExpertId, usize>, workers: usize) -> Balance {
        let most = workers.max(1);
        let rate = |expert: &ExpertId| rates.get(expert).copied().unwrap_or(0.0);
        let mut replicas: BTreeMap<ExpertId, usize> =
            base.iter().map(|(expert, count)| (*expert, (*count).clamp(1, most))).collect();
        for _ in 0..self.redundant {
            let hottest = replicas
                .iter()
                .filter(|(_, count)| **count < most)
                .max_by(|(a, count_a), (b, count_b)| {
                    (rate(a) / **count_a as f64).total_cmp(&(rate(b) / **count_b as f64))
                })
                .map(|(expert, _)| *expert);
            match hottest {
                Some(expert) if rate(&expert) > 0.0 => *replicas.entry(expert).or_default() += 1,
                _ => break,
            }
        }
        let per_replica_rate = replicas.iter().map(|(expert, count)| (*expert, rate(expert) / *count as f64)).collect();
        Balance { replicas, per_replica_rate }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expert(e: u32) -> ExpertId {
        ExpertId::new(0, e)
    }

    #[test]
    fn rates_follow_the_counters_over_the_window() {
        let mut traffic = Traffic::new(Duration::from_millis(1));
        let worker = WorkerId("w".into());
        let start = traffic.since;
        traffic.record(&worker, &[(expert(0), 100), (expert(1), 10)]);
        traffic.record(&worker, &[(expert(0), 300)]);
        let rates = traffic.rates(start + Duration::from_secs(2)).clone();
        // A window much shorter than the interval: the rate is the interval's.
        assert!((rates[&expert(0)] - 150.0).abs() < 1e-6, "{rates:?}");
        assert!((rates[&expert(1)] - 5.0).abs() < 1e-6, "{rates:?}");
        traffic.record(&worker, &[(expert(0), 20)]);
        let rates = traffic.rates(start + Duration::from_secs(4)).clone();
        assert!((rates[&expert(0)] - 10.0).abs() < 1e-6, "a restarted worker counts from zero: {rates:?}");
        assert!(rates[&expert(1)].abs() < 1e-6);
    }

    /// Counters near `u64::MAX` (a worker's own, or a hostile peer's) saturate the tokens offered
    /// rather than wrap them into a small rate.
    #[test]
    fn huge_counters_saturate_instead_of_wrapping() {
        let mut traffic = Traffic::new(Duration::from_millis(1));
        let start = traffic.since;
        let (first, second) = (WorkerId("w1".into()), WorkerId("w2".into()));
        traffic.record(&first, &[(expert(0), u64::MAX)]);
        traffic.record(&second, &[(expert(0), u64::MAX)]);
        traffic.record(&first, &[(expert(0), 5)]);
        let rates = traffic.rates(start + Duration::from_secs(1));
        assert_eq!(rates[&expert(0)], u64::MAX as f64, "{rates:?}");
    }

    /// Worker ids are never reused, so what `forget` guards against is a coordinator that keeps
    /// one map of counters per worker that ever registered.
    #[test]
    fn a_gone_workers_counters_are_dropped_and_its_traffic_stays_counted() {
        let mut traffic = Traffic::new(Duration::from_millis(1));
        let start = traffic.since;
        let (gone, live) = (WorkerId("w1".into()), WorkerId("w2".into()));
        traffic.record(&gone, &[(expert(0), 100)]);
        traffic.record(&live, &[(expert(0), 50)]);
        traffic.forget(&gone);
        assert_eq!(traffic.last.keys().collect::<Vec<_>>(), [&live]);
        let rates = traffic.rates(start + Duration::from_secs(1));
        assert!((rates[&expert(0)] - 150.0).abs() < 1e-6, "{rates:?}");
    }

    #[test]
    fn a_long_window_smooths_a_burst() {
        let mut traffic = Traffic::new(Duration::from_secs(10));
        let start = traffic.since;
        traffic.record(&WorkerId("w".into()), &[(expert(0), 1000)]);
        let rate = traffic.rates(start + Duration::from_secs(1))[&expert(0)];
        assert!(rate > 50.0 && rate < 200.0, "1000 tokens in 1 s seen through a 10 s window: {rate}");
    }

    #[test]
    fn eplb_gives_redundant_replicas_to_the_hottest_experts() {
        let rates: BTreeMap<ExpertId, f64> =
            [(expert(0), 800.0), (expert(1), 300.0), (expert(2), 100.0), (expert(3), 100.0)].into();
        let base = |count: usize| -> BTreeMap<ExpertId, usize> { (0..4).map(|e| (expert(e), count)).collect() };
        let balance = Eplb { redundant: 3 }.balance(&rates, &base(1), 4);
        assert_eq!(balance.replicas[&expert(0)], 3, "800 → 400 → 267 per replica: the hottest twice");
        assert_eq!(balance.replicas[&expert(1)], 2);
        assert_eq!(balance.replicas[&expert(2)], 1);
        assert!((balance.per_replica_rate[&expert(0)] - 800.0 / 3.0).abs() < 1e-9);
        let capped = Eplb { redundant: 10 }.balance(&rates, &base(1), 2);
        assert!(capped.replicas.values().all(|count| *count <= 2), "one replica per worker at most");
        let idle = Eplb { redundant: 3 }.balance(&BTreeMap::new(), &base(2), 4);
        assert!(idle.replicas.values().all(|count| *count == 2), "no traffic, no redundancy");
    }

    /// The hotter expert takes the first extra replica, and then, at 400 per replica, yields the
    /// next to the 500 of the expert that has one.
    #[test]
    fn eplb_weighs_each_expert_by_its_traffic_per_replica_not_its_total() {
        let rates: BTreeMap<ExpertId, f64> = [(expert(0), 500.0), (expert(1), 800.0)].into();
        let base: BTreeMap<ExpertId, usize> = [(expert(0), 1), (expert(1), 1)].into();
        let balance = Eplb { redundant: 2 }.balance(&rates, &base, 4);
        assert_eq!(balance.replicas, [(expert(0), 2), (expert(1), 2)].into());
        assert_eq!(balance.per_replica_rate, [(expert(0), 250.0), (expert(1), 400.0)].into());
    }

    #[test]
    fn imbalance_is_the_busiest_worker_over_the_mean() {
        let rates: BTreeMap<ExpertId, f64> = [(expert(0), 300.0), (expert(1), 100.0)].into();
        let base: BTreeMap<ExpertId, usize> = [(expert(0), 1), (expert(1), 1)].into();
        let balance = Eplb { redundant: 0 }.balance(&rates, &base, 2);
        let (a, b) = (WorkerId("a".into()), WorkerId("b".into()));
        let placement: BTreeMap<ExpertId, Vec<WorkerId>> = [(expert(0), vec![a.clone()]), (expert(1), vec![b])].into();
        assert!((balance.imbalance(placement.iter()) - 1.5).abs() < 1e-9);
        let idle = Eplb { redundant: 0 }.balance(&BTreeMap::new(), &base, 2);
        assert_eq!(idle.imbalance(placement.iter()), 1.0, "no traffic is balanced, not 0 / 0");
        assert_eq!(balance.imbalance(std::iter::empty()), 1.0, "nor are no workers");
    }
}
