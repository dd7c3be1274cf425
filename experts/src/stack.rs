//! Experts computed together. The weights of experts of one form, size, dtype and device live in
//! one tensor per matrix (`[experts, rows, cols]`), each expert's own matrices being views of its
//! slot, so that a step multiplies every expert's rows in one grouped product
//! (`torch._grouped_mm`: one CUTLASS kernel over all the experts on sm90 in bf16; elsewhere
//! libtorch loops over them itself) instead of launching one product per expert.

use tch::{Kind, TchError, Tensor};

use switchyard_model::{Activation, WeightDtype};

use crate::expert::{Expert, Ffn, hidden, kind_of};

/// What experts must share to be stacked: the same form, sizes, dtype and device, and biases or
/// none.
#[derive(Debug, Clone, PartialEq)]
pub struct StackShape {
    pub activation: Activation,
    pub d_model: i64,
    pub d_ff: i64,
    pub dtype: WeightDtype,
    pub device: tch::Device,
    pub biased: bool,
}

/// A grouped product reads each matrix's rows at a multiple of 16 bytes (CUTLASS's alignment).
const ROW_ALIGNMENT_BYTES: i64 = 16;

impl StackShape {
    /// Whether the grouped product can read matrices of this shape (their rows, the input's and
    /// the hidden activations' at multiples of 16 bytes).
    fn aligned(&self) -> bool {
        let element = self.dtype.element_size() as i64;
        [self.d_model, self.d_ff].iter().all(|size| size * element % ROW_ALIGNMENT_BYTES == 0)
    }

    /// Whether a stack of this shape computes its grouped products without the host waiting for
    /// the device: on a CPU (libtorch loops over the experts' products), and on CUDA in bf16 on a
    /// GPU of compute capability `capability` 9.x or 10.x (Hopper, Blackwell: torch's CUTLASS
    /// grouped kernel). Anywhere else torch's fallback first copies the row ends to the host,
    /// which waits for every kernel queued before it; its experts then compute one by one.
    pub fn grouped_without_waiting(&self, capability: Option<(i32, i32)>) -> bool {
        match self.device {
            tch::Device::Cuda(_) => {
                self.dtype == WeightDtype::Bf16 && capability.is_some_and(|(major, _)| (9..=10).contains(&major))
            }
            _ => true,
        }
    }
}

/// The stacked weights of experts of one [`StackShape`]: slot `i` is the `i`-th expert it was
/// built from.
#[derive(Debug)]
pub struct ExpertStack {
    /// `[experts, d_model, w_in rows]`: the stacked input projections transposed (a view), the
    /// column-major right operand `_grouped_mm` takes for `x · wᵀ`.
    w_in_t: Tensor,
    /// `[experts, d_ff, d_model]`, likewise.
    w2_t: Tensor,
    /// The stacked biases (`[experts, w_in rows]`, `[experts, d_model]`) of a biased stack.
    biases: Option<(Tensor, Tensor)>,
    shape: StackShape,
}

impl ExpertStack {
    /// Copies the weights of `experts` (all of one [`StackShape`], see [`Expert::stack_shape`])
    /// into stacked tensors, one matrix after the other, and makes each expert's own matrices
    /// views of its slot, which frees what they held before: while it runs, one matrix of the
    /// experts' is held twice (the input projection, two thirds of a SwiGLU expert's weights). If
    /// the device has no room for a stack, the error says so and every expert still computes
    /// alone, its matrices where they were or in the stack made so far.
    ///
    /// # Panics
    /// If `experts` is empty or its experts do not share one aligned shape.
    pub fn new(experts: &mut [&mut Expert]) -> Result<Self, TchError> {
        let shape = experts[0].stack_shape().expect("a stackable expert");
        assert!(experts.iter().all(|expert| expert.stack_shape().as_ref() == Some(&shape)), "one shape");
        let w_in = restack(experts, |ffn| &mut ffn.w_in)?;
        let w2 = restack(experts, |ffn| &mut ffn.w2)?;
        let biases = match shape.biased {
            false => None,
            true => Some((
                restack(experts, |ffn| ffn.b_in.as_mut().expect("a biased expert"))?,
                restack(experts, |ffn| ffn.b2.as_mut().expect("a biased expert"))?,
            )),
        };
        Ok(Self { w_in_t: w_in.transpose(-2, -1), w2_t: w2.transpose(-2, -1), biases, shape })
    }

    /// Experts in the stack.
    pub fn len(&self) -> usize {
        self.w_in_t.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn shape(&self) -> &StackShape {
        &self.shape
    }

    /// Every slot's rows through its expert, in one grouped product per matrix. `rows` is
    /// `[n, d_model]` (on the stack's device, any float kind), ordered by slot; `ends` (int32, on
    /// the device, one per slot) is where each slot's rows end, so a slot with no rows repeats
    /// the previous end. Returns `[n, d_model]` in the experts' dtype.
    pub fn forward(&self, rows: &Tensor, ends: &Tensor) -> Tensor {
        debug_assert_eq!((ends.kind(), ends.size()), (Kind::Int, vec![self.len() as i64]));
        let rows = rows.to_kind(kind_of(self.shape.dtype));
        let (activation, d_ff) = (self.shape.activation, self.shape.d_ff);
        tch::no_grad(|| {
            let projected = rows.internal_grouped_mm(&self.w_in_t, Some(ends), None, None);
            let output_of = |hidden: Tensor| hidden.internal_grouped_mm(&self.w2_t, Some(ends), None, None);
            let Some((b_in, b2)) = &self.biases else {
                return output_of(hidden(activation, &projected, d_ff));
            };
            // A grouped product adds no bias: each row gets its slot's, repeated by the slots' row
            // counts into as many rows as there are (known here, so the device is not waited for).
            let zero = Tensor::zeros([1], (Kind::Int, ends.device()));
            let counts = ends.diff(1, 0, Some(zero), None);
            let of_rows = |bias: &Tensor| bias.repeat_interleave_self_tensor(&counts, 0, rows.size()[0]);
            let projected = projected + of_rows(b_in);
            output_of(hidden(activation, &projected, d_ff)) + of_rows(b2)
        })
    }
}

/// One matrix of every expert copied into a stack (`[experts, rows, cols]`), each expert's matrix
/// then replaced by a view of its slot.
fn restack(experts: &mut [&mut Expert], matrix: fn(&mut Ffn) -> &mut Tensor) -> Result<Tensor, TchError> {
    let first = matrix(experts[0].ffn_mut()).shallow_clone();
    let mut size = vec![experts.len() as i64];
    size.extend(first.size());
    let stack = Tensor::f_empty(size, (first.kind(), first.device()))?;
    for (slot, expert) in experts.iter_mut().enumerate() {
        stack.f_get(slot as i64)?.f_copy_(matrix(expert.ffn_mut()))?;
    }
    for (slot, expert) in experts.iter_mut().enumerate() {
        *matrix(expert.ffn_mut()) = stack.get(slot as i64);
    }
    Ok(stack)
}

impl Expert {
    /// The shape this expert stacks with others of, or `None` when it computes alone: an
    /// identity expert, one with a bias on one matrix only, or one whose rows the grouped product
    /// cannot read (not a multiple of 16 bytes).
    pub fn stack_shape(&self) -> Option<StackShape> {
        let ffn = self.computed()?;
        let shape = StackShape {
            activation: ffn.activation,
            d_model: self.d_model(),
            d_ff: ffn.d_ff,
            dtype: self.dtype(),
            device: self.device(),
            biased: ffn.b_in.is_some(),
        };
        (ffn.b_in.is_some() == ffn.b2.is_some() && shape.aligned()).then_some(shape)
    }
}

#[cfg(test)]
mod tests {
    use switchyard_model::ModelSpec;
    use tch::Device;

    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec { d_model: 16, d_ff: 24, seed: 9, ..ModelSpec::default_synthetic() }
    }

    fn experts(spec: &ModelSpec, count: u32, dtype: WeightDtype) -> Vec<Expert> {
        (0..count).map(|expert| Expert::synthetic(spec, 0, expert, Device::Cpu, dtype)).collect()
    }

    fn rows(count: i64, width: i64) -> Tensor {
        Tensor::arange(count * width, (Kind::Float, Device::Cpu)).view([count, width]).sin()
    }

    /// Slots of 3, 0, 5 and 1 rows: each slot's rows come out as its expert alone makes them, bit
    /// for bit, and an expert keeps computing alone on the views it was left with.
    #[test]
    fn every_slot_s_rows_come_out_as_its_expert_alone_makes_them() {
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            let spec = spec();
            let mut stacked = experts(&spec, 4, dtype);
            let alone = experts(&spec, 4, dtype);
            let stack = ExpertStack::new(&mut stacked.iter_mut().collect::<Vec<_>>()).expect("stacked");
            assert_eq!((stack.len(), stack.is_empty()), (4, false));
            let counts = [3i32, 0, 5, 1];
            let input = rows(9, 16);
            let ends: Vec<i32> = counts
                .iter()
                .scan(0, |end, count| {
                    *end += count;
                    Some(*end)
                })
                .collect();
            let output = stack.forward(&input, &Tensor::from_slice(&ends));
            assert_eq!(output.size(), [9, 16]);
            let mut start = 0;
            for ((count, expert), own) in counts.iter().zip(&alone).zip(&stacked) {
                let slot_rows = input.narrow(0, start, i64::from(*count));
                let want = expert.forward(&slot_rows);
                assert!(output.narrow(0, start, i64::from(*count)).equal(&want), "{dtype:?}: slot from row {start}");
                assert!(own.forward(&slot_rows).equal(&want), "{dtype:?}: the expert alone, on its views");
                start += i64::from(*count);
            }
            assert_eq!(stacked[2].resident_bytes(), alone[2].resident_bytes());
        }
    }

    /// The stack holds the weights once: each expert's matrices are views of its slot.
    #[test]
    fn each_expert_s_matrices_are_views_of_its_slot() {
        let mut stacked = experts(&spec(), 3, WeightDtype::F32);
        let stack = ExpertStack::new(&mut stacked.iter_mut().collect::<Vec<_>>()).expect("stacked");
        for (slot, expert) in stacked.iter_mut().enumerate() {
            let slot = slot as i64;
            let ffn = expert.ffn_mut();
            assert_eq!(ffn.w_in.data_ptr(), stack.w_in_t.get(slot).data_ptr(), "w_in of slot {slot}");
            assert_eq!(ffn.w2.data_ptr(), stack.w2_t.get(slot).data_ptr(), "w2 of slot {slot}");
        }
    }

    #[test]
    fn identity_or_unaligned_experts_compute_alone() {
        let spec = spec();
        assert!(Expert::synthetic(&spec, 0, 0, Device::Cpu, WeightDtype::F32).stack_shape().is_some());
        assert!(Expert::identity(16, Device::Cpu).stack_shape().is_none());
        // 6 bf16 values are 12 bytes a row; 8 f32 values 32.
        let narrow = ModelSpec { d_model: 6, d_ff: 8, ..spec.clone() };
        assert!(Expert::synthetic(&narrow, 0, 0, Device::Cpu, WeightDtype::Bf16).stack_shape().is_none());
        let narrow_ff = ModelSpec { d_model: 8, d_ff: 6, ..spec };
        assert!(Expert::synthetic(&narrow_ff, 0, 0, Device::Cpu, WeightDtype::F32).stack_shape().is_none());
        let aligned = ModelSpec { d_model: 8, d_ff: 8, ..narrow };
        assert!(Expert::synthetic(&aligned, 0, 0, Device::Cpu, WeightDtype::Bf16).stack_shape().is_some());
    }

    fn gpt_oss_like() -> ModelSpec {
        let activation = Activation::ClampedSwiGlu { alpha: 1.702, limit: 0.5 };
        ModelSpec { activation, expert_bias: true, ..spec() }
    }

    /// GPT-OSS's form: clamped SwiGLU with a bias on every matrix, which the stack adds per row by
    /// slot after each grouped product: in f32 what each expert's own products with their biases
    /// make, to f32's rounding (a bias added after a product, not within it).
    #[test]
    fn a_biased_stack_adds_each_slot_s_biases() {
        let spec = gpt_oss_like();
        let mut stacked = experts(&spec, 3, WeightDtype::F32);
        let alone = experts(&spec, 3, WeightDtype::F32);
        let shape = stacked[0].stack_shape().expect("biased experts stack");
        assert!(shape.biased);
        let stack = ExpertStack::new(&mut stacked.iter_mut().collect::<Vec<_>>()).expect("stacked");
        let input = rows(6, 16) * 3.0;
        let output = stack.forward(&input, &Tensor::from_slice(&[2i32, 2, 6]));
        for (slot, start, count) in [(0, 0, 2), (2, 2, 4)] {
            let want = alone[slot].forward(&input.narrow(0, start, count));
            let error =
                (output.narrow(0, start, count) - &want).norm().double_value(&[]) / want.norm().double_value(&[]);
            assert!(error < 1e-6, "slot {slot}: {error:e}");
        }
        for (own, alone) in stacked.iter().zip(&alone) {
            assert!(own.forward(&input).equal(&alone.forward(&input)), "an expert alone, on its views");
        }
    }

    #[test]
    fn grouped_products_run_on_a_cpu_and_in_bf16_on_hopper_and_blackwell_gpus() {
        let on = |device, dtype| StackShape {
            activation: Activation::SwiGlu,
            d_model: 16,
            d_ff: 24,
            dtype,
            device,
            biased: false,
        };
        assert!(on(Device::Cpu, WeightDtype::F32).grouped_without_waiting(None));
        let cuda_bf16 = on(Device::Cuda(0), WeightDtype::Bf16);
        assert!(cuda_bf16.grouped_without_waiting(Some((9, 0))));
        assert!(cuda_bf16.grouped_without_waiting(Some((10, 0))));
        assert!(!cuda_bf16.grouped_without_waiting(Some((8, 0))), "an A100: torch's fallback");
        assert!(!cuda_bf16.grouped_without_waiting(Some((12, 0))));
        assert!(!cuda_bf16.grouped_without_waiting(None), "capability unknown");
        assert!(!on(Device::Cuda(0), WeightDtype::F32).grouped_without_waiting(Some((9, 0))));
        assert!(!on(Device::Cuda(0), WeightDtype::F16).grouped_without_waiting(Some((9, 0))));
    }

    #[test]
    fn experts_of_different_shapes_differ_in_their_stack_shape() {
        let spec = spec();
        let f32 = Expert::synthetic(&spec, 0, 0, Device::Cpu, WeightDtype::F32).stack_shape();
        let bf16 = Expert::synthetic(&spec, 0, 0, Device::Cpu, WeightDtype::Bf16).stack_shape();
        let wider = ModelSpec { d_ff: 32, ..spec.clone() };
        let wider = Expert::synthetic(&wider, 0, 0, Device::Cpu, WeightDtype::F32).stack_shape();
        let gelu = ModelSpec { activation: Activation::Gelu, ..spec.clone() };
        let gelu = Expert::synthetic(&gelu, 0, 0, Device::Cpu, WeightDtype::F32).stack_shape();
        let biased = ModelSpec { expert_bias: true, ..spec.clone() };
        let biased = Expert::synthetic(&biased, 0, 0, Device::Cpu, WeightDtype::F32).stack_shape();
        assert_ne!(f32, bf16);
        assert_ne!(f32, wider);
        assert_ne!(f32, gelu);
        assert_ne!(f32, biased);
        assert_eq!(f32, Expert::synthetic(&spec, 0, 3, Device::Cpu, WeightDtype::F32).stack_shape());
    }

    /// A two-matrix form: the grouped path's hidden activations are the whole projection.
    #[test]
    fn a_gelu_stack_matches_its_experts() {
        let spec = ModelSpec { activation: Activation::Gelu, ..spec() };
        let mut stacked = experts(&spec, 2, WeightDtype::F32);
        let alone = experts(&spec, 2, WeightDtype::F32);
        let stack = ExpertStack::new(&mut stacked.iter_mut().collect::<Vec<_>>()).expect("stacked");
        let input = rows(4, 16);
        let output = stack.forward(&input, &Tensor::from_slice(&[1i32, 4]));
        assert!(output.narrow(0, 0, 1).equal(&alone[0].forward(&input.narrow(0, 0, 1))));
        assert!(output.narrow(0, 1, 3).equal(&alone[1].forward(&input.narrow(0, 1, 3))));
    }
}
