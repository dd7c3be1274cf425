//! Expert placement: which live workers hold each expert. A pure function of the experts, the live
//! workers (with their memory) and the current placement, so every policy decision is unit-tested.
//!
//! Policy: every expert gets `replicas` holders on distinct workers (fewer when there are fewer
//! workers). An expert stays where it is while its worker lives (moving an expert costs a load).
//! Missing replicas are placed, largest expert first, on a worker the expert is already resident on
//! (a worker rejoining after a coordinator restart) unless that leaves it clearly more loaded, else
//! on the least loaded worker it fits on; then replicas move from the most loaded worker to the
//! least loaded one while that lowers the most loaded (a worker that joined later).
//!
//! "Load" is what [`Goal::load_of`] says one replica of an expert costs: its parameters (the
//! compute every routed token costs) until traffic is known, then its tokens per second times its
//! parameters, shared among its replicas ([`crate::balance`], EPLB). Workers are compared by how
//! long their load keeps them busy: load over their compute rate ([`WorkerSlot::compute`]), so a
//! worker twice as fast is given twice the load. Memory is a bound, never a reason: a worker
//! offering the whole node takes its share, not every expert, and no worker is given more than
//! its memory holds.

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
    /// Its compute rate (any unit, the same for every worker; GFLOP/s from registration); 0:
    /// unknown, counted as the mean of the workers that said.
    pub compute: f64,
    /// Experts the worker reports as already loaded.
    pub resident: BTreeSet<ExpertId>,
}

/// Expert → the workers that serve it, the preferred first.
pub type Placement = BTreeMap<ExpertId, Vec<WorkerId>>;

/// The workers `placement` names for `expert` (empty when none).
pub fn holders<'a>(placement: &'a Placement, expert: &ExpertId) -> &'a [WorkerId] {
    placement.get(expert).map_or(&[], Vec::as_slice)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub placement: Placement,
    /// Experts no worker has room for.
    pub unplaced: Vec<ExpertId>,
}

/// What a plan must satisfy beyond the workers' memory.
#[derive(Clone, Copy)]
pub struct Goal<'a> {
    /// Each expert's size (shared experts may differ from routed ones).
    pub parameters_of: &'a dyn Fn(ExpertId) -> u64,
    /// What one replica of the expert costs the worker holding it.
    pub load_of: &'a dyn Fn(ExpertId) -> u64,
    /// Holders wanted per expert (at most one per worker).
    pub replicas_of: &'a dyn Fn(ExpertId) -> usize,
}

impl<'a> Goal<'a> {
    /// Load by size and the same number of replicas for every expert: the goal before any traffic.
    pub fn by_size(parameters_of: &'a dyn Fn(ExpertId) -> u64, replicas_of: &'a dyn Fn(ExpertId) -> usize) -> Self {
        Self { parameters_of, load_of: parameters_of, replicas_of }
    }
}

/// Workers whose busy times differ by less than this share of the busier one's are balanced:
/// noise in measured traffic does not shuttle experts back and forth. (A bound on each move's gain
/// instead would never move an expert worth less than this share of a worker: with more than 20
/// experts on one worker, a worker that joined later would get none.)
const BALANCED_WITHIN: f64 = 0.05;

#[derive(Debug)]
struct Load {
    parameters: u64,
    room: u64,
    load: u64,
    /// Compute relative to the mean worker.
    speed: f64,
}

impl Load {
    fn fits(&self, extra: u64) -> bool {
        self.parameters + extra <= self.room
    }

    /// How long its load and `extra` keep it busy, in the mean worker's time.
    fn busy_with(&self, extra: u64) -> f64 {
        (self.load + extra) as f64 / self.speed
    }
}

/// Each worker's compute relative to the mean of those that reported one; a worker that did not
/// (or all, when none did) counts as the mean.
fn relative_speeds(workers: &[WorkerSlot]) -> Vec<f64> {
    let known: Vec<f64> = workers.iter().map(|worker| worker.compute).filter(|compute| *compute > 0.0).collect();
    if known.is_empty() {
        return vec![1.0; workers.len()];
    }
    let mean = known.iter().sum::<f64>() / known.len() as f64;
    workers.iter().map(|worker| if worker.compute > 0.0 { worker.compute / mean } else { 1.0 }).collect()
}

pub fn plan(experts: &[ExpertId], goal: Goal<'_>, workers: &[WorkerSlot], current: &Placement) -> Plan {
    let parameters_of = goal.parameters_of;
    let replicas_of = |expert: ExpertId| (goal.replicas_of)(expert).clamp(1, workers.len().max(1));
    let mut loads: BTreeMap<WorkerId, Load> = workers
        .iter()
        .zip(relative_speeds(workers))
        .map(|(worker, speed)| (worker.id.clone(), Load { parameters: 0, room: worker.parameter_room, load: 0, speed }))
        .collect();
    let mut placement = Placement::new();
    for expert in experts {
        for owner in holders(current, expert).iter().take(replicas_of(*expert)) {
            if let Some(load) = loads.get_mut(owner) {
                load.parameters += parameters_of(*expert);
                load.load += (goal.load_of)(*expert);
                placement.entry(*expert).or_default().push(owner.clone());
            }
        }
    }

    let mut unplaced = Vec::new();
    let mut short: Vec<ExpertId> =
        experts.iter().filter(|expert| holders(&placement, expert).len() < replicas_of(**expert)).copied().collect();
    // Heaviest first (LPT): a big expert placed last would land on an already loaded worker.
    short.sort_by_key(|expert| std::cmp::Reverse(((goal.load_of)(*expert), parameters_of(*expert))));
    for expert in &short {
        let size = parameters_of(*expert);
        let weight = (goal.load_of)(*expert);
        while holders(&placement, expert).len() < replicas_of(*expert) {
            let held = holders(&placement, expert).to_vec();
            let candidates = || loads.iter().filter(|(id, load)| load.fits(size) && !held.contains(id));
            // The one least busy once it has the expert; among equals the one with the most room.
            let Some((least_loaded, lightest)) = candidates()
                .min_by(|(_, a), (_, b)| {
                    a.busy_with(weight)
                        .total_cmp(&b.busy_with(weight))
                        .then((b.room - b.parameters).cmp(&(a.room - a.parameters)))
                })
                .map(|(id, load)| (id.clone(), load.busy_with(weight) + weight as f64 / load.speed))
            else {
                if held.is_empty() {
                    unplaced.push(*expert);
                }
                break;
            };
            // A worker that already holds the expert keeps it unless that leaves it clearly busier
            // than the least busy one (by more than this expert).
            let resident_on = workers.iter().find(|worker| {
                worker.resident.contains(expert)
                    && !held.contains(&worker.id)
                    && loads.get(&worker.id).is_some_and(|load| load.fits(size) && load.busy_with(weight) <= lightest)
            });
            let owner = resident_on.map_or(least_loaded, |worker| worker.id.clone());
            if let Some(load) = loads.get_mut(&owner) {
                load.parameters += size;
                load.load += weight;
            }
            placement.entry(*expert).or_default().push(owner);
        }
    }

    rebalance(&mut placement, &mut loads, goal);
    Plan { placement, unplaced }
}

/// Moves replicas from the busiest to the least busy worker while the two are further apart than
/// [`BALANCED_WITHIN`] and a move lowers the busiest one's time. Each move ends with both workers
/// below the busiest one's time, so no placement comes back and the loop ends.
fn rebalance(placement: &mut Placement, loads: &mut BTreeMap<WorkerId, Load>, goal: Goal<'_>) {
    let by_busy = |(_, a): &(&WorkerId, &Load), (_, b): &(&WorkerId, &Load)| a.busy_with(0).total_cmp(&b.busy_with(0));
    loop {
        let most = loads.iter().max_by(by_busy).map(|(id, _)| id.clone());
        let least = loads.iter().min_by(by_busy).map(|(id, _)| id.clone());
        let (Some(most), Some(least)) = (most, least) else {
            return;
        };
        if most == least {
            return;
        }
        // The most loaded worker's highest expert whose move helps: deterministic, keeps low
        // experts stable.
        let (from, to) = (&loads[&most], &loads[&least]);
        let busy = from.busy_with(0);
        if busy - to.busy_with(0) <= BALANCED_WITHIN * busy {
            return;
        }
        let movable = placement
            .iter()
            .rev()
            .filter(|(_, owners)| owners.contains(&most) && !owners.contains(&least))
            .map(|(expert, _)| *expert)
            .find(|expert| {
                // The busiest is less busy without it; the move helps unless it makes the least
                // busy one as busy.
                let weight = (goal.load_of)(*expert);
                to.fits((goal.parameters_of)(*expert)) && weight > 0 && to.busy_with(weight) < busy
            });
        let Some(expert) = movable else {
            return;
        };
        let (size, weight) = ((goal.parameters_of)(expert), (goal.load_of)(expert));
        if let Some(owner) = placement.get_mut(&expert).and_then(|owners| owners.iter_mut().find(|id| **id == most)) {
            *owner = least.clone();
        }
        if let Some(load) = loads.get_mut(&most) {
            load.parameters -= size;
            load.load -= weight;
        }
        if let Some(load) = loads.get_mut(&least) {
            load.parameters += size;
            load.load += weight;
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
        WorkerSlot { id: WorkerId(name.into()), parameter_room: memory, compute: 0.0, resident: BTreeSet::new() }
    }

    fn computing(name: &str, compute: f64) -> WorkerSlot {
        WorkerSlot { compute, ..worker(name, 1000) }
    }

    const TEN: &dyn Fn(ExpertId) -> u64 = &|_| 10;
    const ONE: &dyn Fn(ExpertId) -> usize = &|_| 1;
    const TWO: &dyn Fn(ExpertId) -> usize = &|_| 2;

    fn goal(replicas: usize) -> Goal<'static> {
        Goal::by_size(TEN, if replicas == 1 { ONE } else { TWO })
    }

    /// Each (expert of layer 0, worker) as that expert's one holder.
    fn placed(owners: &[(u32, &str)]) -> Placement {
        owners.iter().map(|(expert, owner)| (ExpertId::new(0, *expert), vec![WorkerId((*owner).into())])).collect()
    }

    fn counts(plan: &Plan) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for owner in plan.placement.values().flatten() {
            *counts.entry(owner.0.clone()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn equal_workers_get_equal_counts() {
        let plan = plan(&experts(8), goal(1), &[worker("a", 1000), worker("b", 1000)], &Placement::new());
        assert_eq!(counts(&plan), BTreeMap::from([("a".into(), 4), ("b".into(), 4)]));
        assert!(plan.unplaced.is_empty());
    }

    /// Memory bounds a worker's share but does not earn it one: the worker that offers the whole
    /// node gets half the experts, not all of them.
    #[test]
    fn memory_is_a_bound_not_a_share() {
        let plan = plan(&experts(8), goal(1), &[worker("node", 1 << 40), worker("small", 100)], &Placement::new());
        assert_eq!(counts(&plan), BTreeMap::from([("node".into(), 4), ("small".into(), 4)]));
        let tight = super::plan(&experts(9), goal(1), &[worker("big", 60), worker("small", 30)], &Placement::new());
        assert_eq!(counts(&tight), BTreeMap::from([("big".into(), 6), ("small".into(), 3)]));
        let crowded = super::plan(&experts(5), goal(1), &[worker("a", 20), worker("b", 20)], &Placement::new());
        assert_eq!(crowded.placement.len(), 4);
        assert_eq!(crowded.unplaced, vec![ExpertId::new(0, 4)]);
    }

    /// Load follows compute: a worker twice as fast serves twice the experts, also when it joins
    /// later; one that did not say counts as the mean of those that did.
    #[test]
    fn a_faster_worker_takes_a_larger_share() {
        let workers = [computing("fast", 200.0), computing("slow", 100.0)];
        let plan = plan(&experts(9), goal(1), &workers, &Placement::new());
        assert_eq!(counts(&plan), BTreeMap::from([("fast".into(), 6), ("slow".into(), 3)]));
        let alone = super::plan(&experts(9), goal(1), &workers[1..], &Placement::new());
        let joined = super::plan(&experts(9), goal(1), &workers, &alone.placement);
        assert_eq!(counts(&joined), BTreeMap::from([("fast".into(), 6), ("slow".into(), 3)]), "moved to the joiner");
        let unsaid = [computing("unknown", 0.0), computing("said", 100.0)];
        let even = super::plan(&experts(8), goal(1), &unsaid, &Placement::new());
        assert_eq!(counts(&even), BTreeMap::from([("said".into(), 4), ("unknown".into(), 4)]));
        // Memory still bounds the fast worker.
        let tight = [WorkerSlot { parameter_room: 40, ..computing("fast", 1000.0) }, computing("slow", 100.0)];
        let bounded = super::plan(&experts(9), goal(1), &tight, &Placement::new());
        assert_eq!(counts(&bounded), BTreeMap::from([("fast".into(), 4), ("slow".into(), 5)]));
    }

    #[test]
    fn a_dead_workers_experts_move_to_the_survivor_and_the_rest_stay() {
        let both = plan(&experts(8), goal(1), &[worker("a", 1000), worker("b", 1000)], &Placement::new());
        let survivor = plan(&experts(8), goal(1), &[worker("a", 1000)], &both.placement);
        assert!(survivor.placement.values().flatten().all(|owner| owner.0 == "a"));
        assert_eq!(survivor.placement.len(), 8);
        for (expert, owners) in &both.placement {
            if owners[0].0 == "a" {
                assert_eq!(survivor.placement[expert], owners.clone(), "{expert} stays");
            }
        }
    }

    #[test]
    fn a_late_joiner_takes_half_and_nothing_else_moves() {
        let alone = plan(&experts(8), goal(1), &[worker("a", 1000)], &Placement::new());
        let joined = plan(&experts(8), goal(1), &[worker("a", 1000), worker("b", 1000)], &alone.placement);
        assert_eq!(counts(&joined), BTreeMap::from([("a".into(), 4), ("b".into(), 4)]));
        let again = plan(&experts(8), goal(1), &[worker("a", 1000), worker("b", 1000)], &joined.placement);
        assert_eq!(again, joined, "a balanced placement is stable");
    }

    /// Each expert is a small share of a worker here (1 of 64, then 1 of 128): the joiner still
    /// takes half, and two joiners a third each.
    #[test]
    fn a_late_joiner_takes_its_share_of_many_small_experts() {
        let alone = plan(&experts(64), goal(1), &[worker("a", 1000)], &Placement::new());
        let pair = [worker("a", 1000), worker("b", 1000)];
        let joined = plan(&experts(64), goal(1), &pair, &alone.placement);
        assert_eq!(counts(&joined), BTreeMap::from([("a".into(), 32), ("b".into(), 32)]));
        assert_eq!(plan(&experts(64), goal(1), &pair, &joined.placement), joined, "stable once balanced");
        let trio = [worker("a", 1000), worker("b", 1000), worker("c", 1000)];
        let alone = plan(&experts(128), goal(1), &trio[..1], &Placement::new());
        let counts_of_three = counts(&plan(&experts(128), goal(1), &trio, &alone.placement));
        // 128 / 3 is 42.7; 44 against 42 is within 5% of the busiest, so balanced.
        assert!(counts_of_three.values().all(|count| (42..=44).contains(count)), "{counts_of_three:?}");
    }

    /// Placement within 5% is left alone, although moving expert 20 (5) would lower the busiest
    /// from 200 to 197: measured traffic that wobbles does not move experts. Further apart, the
    /// busiest worker's highest experts move until it is.
    #[test]
    fn workers_within_five_percent_of_each_other_keep_their_experts() {
        let size = |expert: ExpertId| match expert.expert {
            19 | 20 => 5,
            40 => 2,
            _ => 10,
        };
        let goal = Goal::by_size(&size, ONE);
        let workers = [worker("a", 1000), worker("b", 1000)];
        let split_at = |first_on_b: u32| -> Placement {
            experts(41)
                .into_iter()
                .map(|e| (e, vec![WorkerId(if e.expert < first_on_b { "a" } else { "b" }.into())]))
                .collect()
        };
        let within = split_at(21);
        assert_eq!(plan(&experts(41), goal, &workers, &within).placement, within, "200 against 192");
        let evened = plan(&experts(41), goal, &workers, &split_at(23)).placement;
        assert_eq!(evened, within, "220 against 172: experts 22 and 21 move, then 200 against 192");
    }

    /// Measured traffic wobbles: each of 64 experts' rate is drawn afresh every round, ±20%
    /// around the same mean (a decayed rate wobbles less). Balanced within 5%, two workers rarely
    /// move an expert for it.
    #[test]
    fn traffic_that_wobbles_moves_few_experts() {
        let workers = [worker("a", 1 << 20), worker("b", 1 << 20)];
        let mut current = plan(&experts(64), goal(1), &workers, &Placement::new()).placement;
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let (rounds, mut moved) = (200, 0);
        for _ in 0..rounds {
            let rates: Vec<u64> = (0..64)
                .map(|_| {
                    // xorshift64: a fixed sequence, so the test is the same every run.
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    800 + state % 401
                })
                .collect();
            let load_of = |expert: ExpertId| rates[expert.expert as usize];
            let goal = Goal { parameters_of: TEN, load_of: &load_of, replicas_of: ONE };
            let next = plan(&experts(64), goal, &workers, &current).placement;
            moved += next.iter().filter(|(expert, owners)| current[*expert] != **owners).count();
            current = next;
        }
        // 24 in 200 rounds as written; with no 5% bound, 150.
        assert!(moved <= rounds / 5, "{moved} experts moved in {rounds} rounds");
    }

    /// An expert nobody sends tokens to weighs nothing: moving it costs a load and evens out
    /// nothing, so it stays on the busiest worker.
    #[test]
    fn an_expert_without_traffic_does_not_move_for_nothing() {
        let traffic = |expert: ExpertId| if expert.expert == 0 { 10 } else { 0 };
        let goal = Goal { parameters_of: TEN, load_of: &traffic, replicas_of: ONE };
        let on_a: Placement = experts(2).into_iter().map(|e| (e, vec![WorkerId("a".into())])).collect();
        let plan = plan(&experts(2), goal, &[worker("a", 1000), worker("b", 1000)], &on_a);
        assert_eq!(plan.placement, on_a, "expert 0 alone would make b as busy as a is");
    }

    /// With no load to weigh (no traffic measured), the worker with the most memory free takes an
    /// expert, whichever of the two it is, and nothing moves for nothing.
    #[test]
    fn among_equally_busy_workers_the_one_with_more_memory_free_takes_the_expert() {
        let parameters_of = |expert: ExpertId| if expert.expert == 0 { 20 } else { 10 };
        let idle: &dyn Fn(ExpertId) -> u64 = &|_| 0;
        let goal = Goal { parameters_of: &parameters_of, load_of: idle, replicas_of: ONE };
        let workers = [worker("a", 100), worker("b", 100)];
        for (holder, other) in [("a", "b"), ("b", "a")] {
            let current: Placement = [(ExpertId::new(0, 0), vec![WorkerId(holder.into())])].into();
            let plan = plan(&experts(2), goal, &workers, &current);
            assert_eq!(plan.placement[&ExpertId::new(0, 0)][0].0, holder, "stays");
            assert_eq!(plan.placement[&ExpertId::new(0, 1)][0].0, other, "80 free on {holder}, 100 on {other}");
        }
    }

    #[test]
    fn a_resident_expert_is_not_kept_past_its_workers_memory() {
        let mut a = worker("a", 20);
        a.resident = [0, 1, 2].map(|e| ExpertId::new(0, e)).into();
        let on_b: Placement = (3..7).map(|e| (ExpertId::new(0, e), vec![WorkerId("b".into())])).collect();
        let plan = plan(&experts(7), goal(1), &[a, worker("b", 1000)], &on_b);
        let holder = |e: u32| plan.placement[&ExpertId::new(0, e)][0].0.clone();
        assert_eq!([holder(0), holder(1), holder(2)], ["a", "a", "b"], "a has room for two");
    }

    /// A worker keeps an expert it already holds while that leaves it at most one expert's time
    /// (on the least busy worker) busier than the least busy one would be with it, in each
    /// worker's own speed: here expert 0 (load 10) is resident on "a" (speed 1, expert 1's load
    /// already on it) and "b" (speed 0.5, load 5) is least busy at 30 with it, so "a" keeps it up
    /// to 30 + 10 / 0.5 = 50. "c" (no room) only sets the mean speed and, being least busy with
    /// nothing to take, keeps the rebalancing from moving anything after.
    #[test]
    fn a_resident_expert_stays_unless_its_worker_is_busier_by_more_than_the_expert() {
        for (load_on_a, kept) in [(40, true), (50, false)] {
            let load_of = move |expert: ExpertId| [10, load_on_a, 5][expert.expert as usize];
            let goal = Goal { parameters_of: TEN, load_of: &load_of, replicas_of: ONE };
            let mut a = computing("a", 200.0);
            a.resident = [ExpertId::new(0, 0)].into();
            let workers = [a, computing("b", 100.0), WorkerSlot { parameter_room: 0, ..computing("c", 300.0) }];
            let plan = plan(&experts(3), goal, &workers, &placed(&[(1, "a"), (2, "b")]));
            let expected = if kept { "a" } else { "b" };
            assert_eq!(plan.placement[&ExpertId::new(0, 0)][0].0, expected, "with {load_on_a} on a");
            assert_eq!(counts(&plan).values().sum::<usize>(), 3, "{:?}", plan.placement);
        }
    }

    /// Rebalancing frees the memory of the expert it moves off a worker, and no more: "a" (95 of
    /// load) gives expert 1 to the idle "c", then is the least busy and takes one of the busiest
    /// "b"'s experts exactly when what "a" has left leaves room for it.
    #[test]
    fn a_worker_that_gave_an_expert_away_has_its_room_back_for_another() {
        let load_of = |expert: ExpertId| [45, 50, 30, 30, 30][expert.expert as usize];
        for (sizes, rooms, last_expert_on) in
            [([10, 10, 10, 10, 10], [20, 30, 10], "a"), ([18, 2, 5, 5, 5], [20, 15, 2], "b")]
        {
            let parameters_of = move |expert: ExpertId| sizes[expert.expert as usize];
            let goal = Goal { parameters_of: &parameters_of, load_of: &load_of, replicas_of: ONE };
            let workers = [worker("a", rooms[0]), worker("b", rooms[1]), worker("c", rooms[2])];
            let current = placed(&[(0, "a"), (1, "a"), (2, "b"), (3, "b"), (4, "b")]);
            let plan = plan(&experts(5), goal, &workers, &current);
            let owners: Vec<&str> = plan.placement.values().map(|owners| owners[0].0.as_str()).collect();
            assert_eq!(owners, ["a", "c", "b", "b", last_expert_on], "sizes {sizes:?}, rooms {rooms:?}");
        }
    }

    /// Speeds are relative to the mean of the workers that said theirs (200 here): the one that
    /// did not counts as that mean.
    #[test]
    fn a_worker_that_did_not_say_its_speed_counts_as_the_mean_of_those_that_did() {
        let workers = [computing("unknown", 0.0), computing("slow", 100.0), computing("fast", 300.0)];
        assert_eq!(relative_speeds(&workers), [1.0, 0.5, 1.5]);
        let plan = plan(&experts(12), goal(1), &workers, &Placement::new());
        assert_eq!(counts(&plan), BTreeMap::from([("fast".into(), 6), ("slow".into(), 2), ("unknown".into(), 4)]));
    }

    #[test]
    fn a_large_shared_expert_counts_by_its_size() {
        // Expert 4 is a shared expert four times the size of the others.
        let parameters_of = |expert: ExpertId| if expert.expert == 4 { 40 } else { 10 };
        let goal = Goal::by_size(&parameters_of, ONE);
        let plan = plan(&experts(5), goal, &[worker("a", 1000), worker("b", 1000)], &Placement::new());
        let size = |name: &str| {
            plan.placement.iter().filter(|(_, owners)| owners[0].0 == name).map(|(e, _)| parameters_of(*e)).sum::<u64>()
        };
        assert_eq!((size("a"), size("b")), (40, 40), "the big expert alone balances four small ones");
    }

    #[test]
    fn resident_experts_are_adopted_after_a_coordinator_restart() {
        let mut a = worker("a", 1000);
        let mut b = worker("b", 1000);
        a.resident = [ExpertId::new(0, 1), ExpertId::new(0, 3)].into();
        b.resident = [ExpertId::new(0, 0), ExpertId::new(0, 2)].into();
        let plan = plan(&experts(4), goal(1), &[a, b], &Placement::new());
        let owners: Vec<_> = plan.placement.values().map(|owners| owners[0].0.as_str()).collect();
        assert_eq!(owners, ["b", "a", "b", "a"]);
    }

    #[test]
    fn replicas_live_on_distinct_workers_and_balance() {
        let workers = [worker("a", 1000), worker("b", 1000), worker("c", 1000)];
        let plan = plan(&experts(6), goal(2), &workers, &Placement::new());
        for (expert, owners) in &plan.placement {
            assert_eq!(owners.len(), 2, "{expert}");
            assert_ne!(owners[0], owners[1], "{expert}: two replicas on one worker");
        }
        assert_eq!(counts(&plan), BTreeMap::from([("a".into(), 4), ("b".into(), 4), ("c".into(), 4)]));
        let one_worker = super::plan(&experts(6), goal(2), &workers[..1], &Placement::new());
        assert!(one_worker.placement.values().all(|owners| owners.len() == 1), "one replica per worker at most");
    }

    #[test]
    fn a_lost_replica_is_replaced_and_the_survivor_keeps_its_copy() {
        let workers = [worker("a", 1000), worker("b", 1000), worker("c", 1000)];
        let before = plan(&experts(6), goal(2), &workers, &Placement::new());
        let after = plan(&experts(6), goal(2), &[workers[0].clone(), workers[2].clone()], &before.placement);
        for (expert, owners) in &after.placement {
            assert_eq!(owners.len(), 2, "{expert}");
            let kept: Vec<_> = before.placement[expert].iter().filter(|owner| owner.0 != "b").collect();
            assert!(kept.iter().all(|owner| owners.contains(owner)), "{expert}: a surviving replica moved");
        }
    }

    /// EPLB's outcome: a hot expert with two replicas and the cold ones spread so that each
    /// worker's share of the traffic is even, where by size alone the hot expert's worker would
    /// carry most of it.
    #[test]
    fn measured_load_spreads_a_hot_expert_and_balances_the_rest() {
        // Expert 0 takes 8 units of traffic, the seven others 1 each: 15 in all.
        let traffic = |expert: ExpertId| if expert.expert == 0 { 8 } else { 1 };
        let replicas = |expert: ExpertId| if expert.expert == 0 { 2 } else { 1 };
        let per_replica = |expert: ExpertId| traffic(expert) * 10 / replicas(expert) as u64;
        let measured = Goal { parameters_of: TEN, load_of: &per_replica, replicas_of: &replicas };
        let workers = [worker("a", 1000), worker("b", 1000), worker("c", 1000)];
        let by_size = plan(&experts(8), goal(1), &workers, &Placement::new());
        let balanced = plan(&experts(8), measured, &workers, &by_size.placement);
        assert_eq!(balanced.placement[&ExpertId::new(0, 0)].len(), 2, "the hot expert is on two workers");
        let load_on = |plan: &Plan, name: &str| -> u64 {
            plan.placement
                .iter()
                .filter(|(_, owners)| owners.iter().any(|owner| owner.0 == name))
                .map(|(expert, owners)| traffic(*expert) * 10 / owners.len() as u64)
                .sum()
        };
        let loads: Vec<u64> = ["a", "b", "c"].iter().map(|name| load_on(&balanced, name)).collect();
        assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 10, "{loads:?}: within one cold expert");
        let before: Vec<u64> = ["a", "b", "c"].iter().map(|name| load_on(&by_size, name)).collect();
        assert!(before.iter().max() > loads.iter().max(), "{before:?} -> {loads:?}");
        let again = plan(&experts(8), measured, &workers, &balanced.placement);
        assert_eq!(again, balanced, "a balanced placement is stable");
    }
}
