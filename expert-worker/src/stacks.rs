//! The resident experts' stacks (`--grouped-experts`): each layer's experts of one shape in one
//! [`ExpertStack`], so that a step computes all of them that have rows in one grouped product per
//! matrix. A layer is restacked whenever a load or an unload changes its experts, so that a stack
//! holds exactly the experts resident (an unloaded expert's weights are freed with the old stack).

use std::collections::HashMap;

use switchyard_experts::device::gpu_compute_capability;
use switchyard_experts::{Expert, ExpertStack};
use switchyard_model::ExpertId;

#[derive(Debug, Default)]
pub struct Stacks {
    enabled: bool,
    stacks: Vec<LayerStack>,
    /// Each stacked expert's stack (an index into `stacks`) and slot in it.
    slots: HashMap<ExpertId, (usize, usize)>,
}

#[derive(Debug)]
struct LayerStack {
    layer: u32,
    /// The experts in the stack's slots, in order.
    members: Vec<ExpertId>,
    stack: ExpertStack,
}

impl Stacks {
    /// Stacks that [`Stacks::restack`] fills only when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Self { enabled, ..Self::default() }
    }

    /// Rebuilds `layer`'s stacks from its experts resident now: the experts that share a
    /// [`switchyard_experts::StackShape`] are one stack, in the order of their ids (also one
    /// expert alone, so that none keeps a view of storage an unloaded expert's weights are in).
    /// Experts whose grouped products would make the host wait for the device (see
    /// [`switchyard_experts::StackShape::grouped_without_waiting`]) are not stacked, and where the
    /// device has no room for a new stack, that group's experts go on computing alone.
    pub fn restack(&mut self, layer: u32, experts: &mut HashMap<ExpertId, Expert>) {
        if !self.enabled {
            return;
        }
        // The old stacks go first: their experts' views keep their storage until restacked.
        self.stacks.retain(|stack| stack.layer != layer);
        let mut members: Vec<(&ExpertId, &mut Expert)> =
            experts.iter_mut().filter(|(id, _)| id.layer == layer).collect();
        members.sort_by_key(|(id, _)| **id);
        let capability = match members.first().map(|(_, expert)| expert.device()) {
            Some(tch::Device::Cuda(index)) => compute_capability(index),
            _ => None,
        };
        members
            .retain(|(_, expert)| expert.stack_shape().is_some_and(|shape| shape.grouped_without_waiting(capability)));
        let mut groups: Vec<Vec<(&ExpertId, &mut Expert)>> = Vec::new();
        for member in members {
            let shape = member.1.stack_shape();
            match groups.iter_mut().find(|group| group[0].1.stack_shape() == shape) {
                Some(group) => group.push(member),
                None => groups.push(vec![member]),
            }
        }
        for group in groups {
            let members: Vec<ExpertId> = group.iter().map(|(id, _)| **id).collect();
            let mut group: Vec<&mut Expert> = group.into_iter().map(|(_, expert)| expert).collect();
            match ExpertStack::new(&mut group) {
                Ok(stack) => self.stacks.push(LayerStack { layer, members, stack }),
                Err(error) => {
                    tracing::warn!(layer, experts = members.len(), %error, "experts left to compute one by one: no room to stack them");
                }
            }
        }
        self.slots = self
            .stacks
            .iter()
            .enumerate()
            .flat_map(|(index, stack)| stack.members.iter().enumerate().map(move |(slot, id)| (*id, (index, slot))))
            .collect();
    }

    /// Where `expert` is stacked: its stack's index and its slot.
    pub fn slot(&self, expert: &ExpertId) -> Option<(usize, usize)> {
        self.slots.get(expert).copied()
    }

    pub fn stack(&self, index: usize) -> &ExpertStack {
        &self.stacks[index].stack
    }
}

/// The compute capability of `cuda:index`, or `None` (logged) when the driver cannot say: its
/// experts then compute one by one.
fn compute_capability(index: usize) -> Option<(i32, i32)> {
    gpu_compute_capability(index)
        .inspect_err(|error| tracing::warn!(index, %error, "experts computed one by one: no compute capability"))
        .ok()
}

#[cfg(test)]
mod tests {
    use switchyard_model::{Activation, ModelSpec, WeightDtype};
    use tch::{Device, Kind, Tensor};

    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec { d_model: 16, d_ff: 24, seed: 4, ..ModelSpec::default_synthetic() }
    }

    fn expert(spec: &ModelSpec, layer: u32, expert: u32) -> (ExpertId, Expert) {
        (ExpertId::new(layer, expert), Expert::synthetic(spec, layer, expert, Device::Cpu, WeightDtype::F32))
    }

    fn rows() -> Tensor {
        Tensor::arange(3 * 16, (Kind::Float, Device::Cpu)).view([3, 16]).cos()
    }

    /// Layer 0: three SwiGLU experts, one GELU expert and an identity one; layer 1: one expert.
    fn resident() -> HashMap<ExpertId, Expert> {
        let gelu = ModelSpec { activation: Activation::Gelu, ..spec() };
        HashMap::from([
            expert(&spec(), 0, 0),
            expert(&spec(), 0, 2),
            expert(&spec(), 0, 5),
            expert(&gelu, 0, 7),
            (ExpertId::new(0, 9), Expert::identity(16, Device::Cpu)),
            expert(&spec(), 1, 0),
        ])
    }

    #[test]
    fn a_layer_s_experts_of_one_shape_share_a_stack_in_the_order_of_their_ids() {
        let mut experts = resident();
        let mut stacks = Stacks::new(true);
        stacks.restack(0, &mut experts);
        let (swiglu, _) = stacks.slot(&ExpertId::new(0, 0)).expect("stacked");
        assert_eq!(stacks.slot(&ExpertId::new(0, 2)), Some((swiglu, 1)));
        assert_eq!(stacks.slot(&ExpertId::new(0, 5)), Some((swiglu, 2)));
        assert_eq!(stacks.stack(swiglu).len(), 3);
        let (gelu, slot) = stacks.slot(&ExpertId::new(0, 7)).expect("a stack of its own");
        assert_ne!(gelu, swiglu);
        assert_eq!((slot, stacks.stack(gelu).len()), (0, 1));
        assert_eq!(stacks.slot(&ExpertId::new(0, 9)), None, "an identity expert computes nothing");
        assert_eq!(stacks.slot(&ExpertId::new(1, 0)), None, "layer 1 was not restacked");
        stacks.restack(1, &mut experts);
        assert!(stacks.slot(&ExpertId::new(1, 0)).is_some());
        assert_eq!(stacks.slot(&ExpertId::new(0, 5)), Some((swiglu, 2)), "layer 0's stacks stay");
    }

    #[test]
    fn an_unloaded_expert_leaves_its_stack_and_the_rest_compute_as_before() {
        let mut experts = resident();
        let fresh = |id: u32| expert(&spec(), 0, id).1;
        let mut stacks = Stacks::new(true);
        stacks.restack(0, &mut experts);
        experts.remove(&ExpertId::new(0, 2));
        stacks.restack(0, &mut experts);
        let (stack, slot) = stacks.slot(&ExpertId::new(0, 5)).expect("still stacked");
        assert_eq!((slot, stacks.stack(stack).len()), (1, 2));
        assert_eq!(stacks.slot(&ExpertId::new(0, 2)), None);
        for id in [0, 5] {
            assert!(experts[&ExpertId::new(0, id)].forward(&rows()).equal(&fresh(id).forward(&rows())), "expert {id}");
        }
        let output = stacks.stack(stack).forward(&rows(), &Tensor::from_slice(&[1i32, 3]));
        assert!(output.narrow(0, 1, 2).equal(&fresh(5).forward(&rows().narrow(0, 1, 2))));
    }

    #[test]
    fn nothing_is_stacked_unless_enabled() {
        let mut experts = resident();
        let mut stacks = Stacks::new(false);
        stacks.restack(0, &mut experts);
        assert_eq!(stacks.slot(&ExpertId::new(0, 0)), None);
    }
}
