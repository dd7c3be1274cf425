//! Expert placement: which live worker holds each expert. A pure function of the experts, the live
//! workers (with their memory) and the current placement, so every policy decision is unit-tested.
//!
//! Policy: keep every expert where it is while its worker lives (moving an expert costs a load);
//! place each unplaced expert, largest first, on the worker it is already resident on (a worker
//! rejoining after a coordinator restart), else on the worker that would be least full; then move experts from the
//! fullest worker to the emptiest while that lowers the fullest one (a worker that joined later).
//! "Full" is assigned parameters over the parameters a worker has room for (its memory over the
//! size of one element of the dtype it keeps experts in), so equal workers get equal counts, a
//! worker with twice the memory or half the element size gets twice the experts, and no worker is
//! ever given more than its memory holds.

use std::collections::{BTreeMap, BTreeSet};

use switchyard_model::ExpertId;

/// A worker's identity, assigned by the coordinator at registration.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub String);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What placement needs to know about a live worker.
#[derive(Debug, Clone)]
pub struct WorkerSlot {
    pub id: WorkerId,
    /// Expert parameters the worker has memory for, in the dtype it keeps them resident in.
    pub parameter_room: u64,
    /// Experts the worker reports as already loaded.
    pub resident: BTreeSet<ExpertId>,
}

/// Expert → the worker that serves it.
pub type Placement = BTreeMap<ExpertId, WorkerId>;

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub placement: Placement,
    /// Experts no worker has room for.
    pub unplaced: Vec<ExpertId>,
}

struct Load {
    parameters: u64,
    room: u64,
}

impl Load {
    fn fill_with(&self, extra: u64) -> f64 {
        (self.parameters + extra) as f64 / self.room.max(1) as f64
    }

    fn fits(&self, extra: u64) -> bool {
        self.parameters + extra <= self.room
    }
}

/// `parameters_of` gives each expert's size (shared experts may differ from routed ones).
pub fn plan(
    experts: &[ExpertId],
    parameters_of: &dyn Fn(ExpertId) -> u64,
    workers: &[WorkerSlot],
    current: &Placement,
) -> Plan {
    let mut loads: BTreeMap<WorkerId, Load> =
        workers.iter().map(|worker| (worker.id.clone(), Load { parameters: 0, room: worker.parameter_room })).collect();
    let mut placement = Placement::new();
    for expert in experts {
        if let Some(owner) = current.get(expert)
            && let Some(load) = loads.get_mut(owner)
        {
            load.parameters += parameters_of(*expert);
            placement.insert(*expert, owner.clone());
        }
    }

    let mut unplaced = Vec::new();
    let mut homeless: Vec<ExpertId> =
        experts.iter().filter(|expert| !placement.contains_key(expert)).copied().collect();
    // Largest first (LPT): a big shared expert placed last would land on an already loaded worker.
    homeless.sort_by_key(|expert| std::cmp::Reverse(parameters_of(*expert)));
    for expert in &homeless {
        let expert_parameters = parameters_of(*expert);
        let least_full = loads
            .iter()
            .filter(|(_, load)| load.fits(expert_parameters))
            .min_by(|(_, a), (_, b)| a.fill_with(expert_parameters).total_cmp(&b.fill_with(expert_parameters)))
            .map(|(id, load)| (id.clone(), load.fill_with(expert_parameters)));
        let Some((least_full, least_fill)) = least_full else {
            unplaced.push(*expert);
            continue;
        };
        // Prefer a worker that already holds the expert unless that leaves it clearly fuller.
        let resident_on = workers.iter().find(|worker| {
            worker.resident.contains(expert)
                && loads.get(&worker.id).is_some_and(|load| {
                    load.fits(expert_parameters)
                        && load.parameters + expert_parameters
                            <= (least_fill * load.room as f64) as u64 + expert_parameters
                })
        });
        let owner = resident_on.map_or(least_full, |worker| worker.id.clone());
        if let Some(load) = loads.get_mut(&owner) {
            load.parameters += expert_parameters;
        }
        placement.insert(*expert, owner);
    }

    rebalance(&mut placement, &mut loads, parameters_of);
    Plan { placement, unplaced }
}

/// Moves experts from the fullest to the emptiest worker while that lowers the fullest one.
fn rebalance(placement: &mut Placement, loads: &mut BTreeMap<WorkerId, Load>, parameters_of: &dyn Fn(ExpertId) -> u64) {
    loop {
        let fullest =
            loads.iter().max_by(|(_, a), (_, b)| a.fill_with(0).total_cmp(&b.fill_with(0))).map(|(id, _)| id.clone());
        let emptiest =
            loads.iter().min_by(|(_, a), (_, b)| a.fill_with(0).total_cmp(&b.fill_with(0))).map(|(id, _)| id.clone());
        let (Some(fullest), Some(emptiest)) = (fullest, emptiest) else {
            return;
        };
        if fullest == emptiest {
            return;
        }
        // The fullest worker's highest expert whose move helps: deterministic, keeps low experts stable.
        let (from, to) = (&loads[&fullest], &loads[&emptiest]);
        let movable =
            placement.iter().rev().filter(|(_, owner)| **owner == fullest).map(|(expert, _)| *expert).find(|expert| {
                let expert_parameters = parameters_of(*expert);
                to.fits(expert_parameters) && to.fill_with(expert_parameters) < from.fill_with(0)
            });
        let Some(expert) = movable else {
            return;
        };
        let expert_parameters = parameters_of(expert);
        placement.insert(expert, emptiest.clone());
        if let Some(load) = loads.get_mut(&fullest) {
            load.parameters -= expert_parameters;
        }
        if let Some(load) = loads.get_mut(&emptiest) {
            load.parameters += expert_parameters;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn experts(count: u32) -> Vec<ExpertId> {
        (0..count).map(|e| ExpertId::new(0, e)).collect()
    }

    fn worker(name: &str, memory: u64) -> WorkerSlot {
        WorkerSlot { id: WorkerId(name.into()), parameter_room: memory, resident: BTreeSet::new() }
    }

    fn counts(plan: &Plan) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for owner in plan.placement.values() {
            *counts.entry(owner.0.clone()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn equal_workers_get_equal_counts() {
        let plan = plan(&experts(8), &|_| 10, &[worker("a", 1000), worker("b", 1000)], &Placement::new());
        assert_eq!(counts(&plan), BTreeMap::from([("a".into(), 4), ("b".into(), 4)]));
        assert!(plan.unplaced.is_empty());
    }

    #[test]
    fn memory_weights_the_share_and_is_never_exceeded() {
        let plan = plan(&experts(9), &|_| 10, &[worker("big", 60), worker("small", 30)], &Placement::new());
        assert_eq!(counts(&plan), BTreeMap::from([("big".into(), 6), ("small".into(), 3)]));
        let crowded = super::plan(&experts(5), &|_| 10, &[worker("a", 20), worker("b", 20)], &Placement::new());
        assert_eq!(crowded.placement.len(), 4);
        assert_eq!(crowded.unplaced, vec![ExpertId::new(0, 4)]);
    }

    #[test]
    fn a_dead_workers_experts_move_to_the_survivor_and_the_rest_stay() {
        let both = plan(&experts(8), &|_| 10, &[worker("a", 1000), worker("b", 1000)], &Placement::new());
        let survivor = plan(&experts(8), &|_| 10, &[worker("a", 1000)], &both.placement);
        assert!(survivor.placement.values().all(|owner| owner.0 == "a"));
        assert_eq!(survivor.placement.len(), 8);
    }

    #[test]
    fn a_late_joiner_takes_half_and_nothing_else_moves() {
        let alone = plan(&experts(8), &|_| 10, &[worker("a", 1000)], &Placement::new());
        let joined = plan(&experts(8), &|_| 10, &[worker("a", 1000), worker("b", 1000)], &alone.placement);
        assert_eq!(counts(&joined), BTreeMap::from([("a".into(), 4), ("b".into(), 4)]));
        let again = plan(&experts(8), &|_| 10, &[worker("a", 1000), worker("b", 1000)], &joined.placement);
        assert_eq!(again, joined, "a balanced placement is stable");
    }

    #[test]
    fn a_large_shared_expert_counts_by_its_size() {
        // Expert 4 is a shared expert four times the size of the others.
        let parameters_of = |expert: ExpertId| if expert.expert == 4 { 40 } else { 10 };
        let plan = plan(&experts(5), &parameters_of, &[worker("a", 1000), worker("b", 1000)], &Placement::new());
        let size = |name: &str| {
            plan.placement.iter().filter(|(_, owner)| owner.0 == name).map(|(e, _)| parameters_of(*e)).sum::<u64>()
        };
        assert_eq!((size("a"), size("b")), (40, 40), "the big expert alone balances four small ones");
    }

    #[test]
    fn resident_experts_are_adopted_after_a_coordinator_restart() {
        let mut a = worker("a", 1000);
        let mut b = worker("b", 1000);
        a.resident = [ExpertId::new(0, 1), ExpertId::new(0, 3)].into();
        b.resident = [ExpertId::new(0, 0), ExpertId::new(0, 2)].into();
        let plan = plan(&experts(4), &|_| 10, &[a, b], &Placement::new());
        let owners: Vec<_> = plan.placement.values().map(|owner| owner.0.as_str()).collect();
        assert_eq!(owners, ["b", "a", "b", "a"]);
    }
}
