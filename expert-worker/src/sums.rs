//! The per-token sums of token-major requests in progress: each expert part's gate-weighted
//! output rows added at its tokens into its request's f32 sum on the device, which stays there
//! until the request's last part is in, possibly steps later, and then goes back as that request's
//! `combined` answer. Identity experts' parts add only their gate weights (with in-place transfers,
//! a CPU's, the answer is then made from the request's own bytes: [`identity_sum`]).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use switchyard_proto::wire::WireDtype;
use tch::{Device, Kind, Tensor};

use crate::identity_sum;
use crate::request::{Gathered, SharedRows};
use crate::staging::Transfers;

/// The per-token sums of token-major requests in progress, on the device, by their shared rows.
#[derive(Debug)]
pub struct Sums {
    device: Device,
    transfers: Transfers,
    in_progress: HashMap<usize, Sum>,
}

#[derive(Debug)]
struct Sum {
    shared: Arc<SharedRows>,
    /// `[tokens, width]` in f32: the parts of experts with weights, once one was added.
    total: Option<Tensor>,
    /// Per token, the summed gate weights of identity experts: their parts add up to
    /// `weight · row`, so they are summed as weights and applied once, when the sum finishes,
    /// instead of one gather and one scatter per expert (in place, from the request's own bytes:
    /// `identity_sum`).
    identity_weights: Vec<f32>,
    /// Expert parts still to add.
    remaining: usize,
}

/// A request's sum once its last part is in: on the device (the download converts it to the
/// answer's dtype), or already the answer's bytes (identity experts' parts only, in place).
pub(crate) enum Finished {
    OnDevice(Tensor),
    Answer(Bytes),
}

/// What one expert part adds into its request's sum.
pub(crate) enum Part<'a> {
    /// The expert's output rows, one per index of the part, and the part's indices and weights.
    Rows(&'a Tensor, &'a GatherIndex),
    /// An identity expert's: its input rows, so nothing to compute.
    Identity,
}

/// The key of a request's sum: its shared rows' address, alike for every part of it.
pub(crate) fn key_of(shared: &Arc<SharedRows>) -> usize {
    Arc::as_ptr(shared) as usize
}

/// A token-major part's token indices and gate weights (`[rows, 1]`) where its rows are. Copied
/// (on CUDA) they are views of the step's upload, copied with it: made from host memory one by one, each
/// copy would wait for every kernel queued before it, and the host could not queue an expert's
/// kernels while the previous expert's ran.
#[derive(Debug)]
pub(crate) struct GatherIndex {
    pub(crate) indices: Tensor,
    pub(crate) weights: Tensor,
}

impl GatherIndex {
    /// Host tensors made from the part's own vectors.
    pub(crate) fn on_host(gathered: &Gathered) -> Self {
        Self {
            indices: Tensor::from_slice(&gathered.indices),
            weights: Tensor::from_slice(&gathered.weights).view([-1, 1]),
        }
    }

    /// Views of the upload where [`GatherIndex::uploads`] put them, at `offsets[0]` and `offsets[1]`.
    pub(crate) fn staged(staged: &Tensor, offsets: &[usize], gathered: &Gathered) -> Self {
        let rows = gathered.indices.len() as i64;
        let view = |offset: usize, bytes: i64, kind: Kind| staged.narrow(0, offset as i64, bytes).view_dtype(kind);
        Self {
            indices: view(offsets[0], rows * 8, Kind::Int64),
            weights: view(offsets[1], rows * 4, Kind::Float).view([-1, 1]),
        }
    }

    /// The two runs the upload carries for [`GatherIndex::staged`].
    pub(crate) fn uploads(gathered: &Gathered) -> [Vec<&[u8]>; 2] {
        [vec![bytemuck::cast_slice(&gathered.indices)], vec![bytemuck::cast_slice(&gathered.weights)]]
    }
}

impl Sums {
    pub fn new(device: Device, transfers: Transfers) -> Self {
        Self { device, transfers, in_progress: HashMap::new() }
    }

    /// Forgets the sums no queued entry will add to any more (their request failed or was
    /// abandoned): only this map still holds their rows.
    pub fn forget_orphans(&mut self) {
        self.in_progress.retain(|_, sum| Arc::strong_count(&sum.shared) > 1);
    }

    pub fn len(&self) -> usize {
        self.in_progress.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_progress.is_empty()
    }

    /// Adds `weights · part` at `indices` into the sum of `shared`, whose rows this step holds as
    /// `shared_rows` (in place, not uploaded for identity experts: their parts are read from the
    /// request's bytes); returns the finished sum when this was its last part, as an answer of
    /// `answer_dtype` where it is made on the host.
    pub(crate) fn add(
        &mut self,
        gathered: &Gathered,
        part: Part,
        shared_rows: Option<&Tensor>,
        answer_dtype: WireDtype,
    ) -> Option<Finished> {
        let key = key_of(&gathered.shared);
        let sum = self.in_progress.entry(key).or_insert_with(|| Sum {
            shared: gathered.shared.clone(),
            total: None,
            identity_weights: Vec::new(),
            remaining: gathered.shared.parts,
        });
        let device = self.device;
        match part {
            Part::Rows(rows, index) => {
                let total = sum.total.get_or_insert_with(|| {
                    let shape = [gathered.shared.tokens as i64, gathered.shared.width as i64];
                    Tensor::zeros(shape, (Kind::Float, device))
                });
                let _ = total.index_add_(0, &index.indices, &weighted_f32(rows, &index.weights));
            }
            Part::Identity => {
                if sum.identity_weights.is_empty() {
                    sum.identity_weights = vec![0.0; gathered.shared.tokens];
                }
                for (&token, &weight) in gathered.indices.iter().zip(&gathered.weights) {
                    sum.identity_weights[token as usize] += weight;
                }
            }
        }
        sum.remaining -= 1;
        if sum.remaining > 0 {
            return None;
        }
        let sum = self.in_progress.remove(&key)?;
        if sum.identity_weights.is_empty() {
            return sum.total.map(Finished::OnDevice);
        }
        let (shared, weights) = (&sum.shared, &sum.identity_weights);
        if self.transfers == Transfers::InPlace {
            return Some(match sum.total {
                None => Finished::Answer(identity_sum::weighted_answer(shared, weights, answer_dtype)),
                Some(total) => {
                    let values = Tensor::from_slice(&identity_sum::weighted_values(shared, weights));
                    Finished::OnDevice(total + values.view([shared.tokens as i64, shared.width as i64]))
                }
            });
        }
        let rows = shared_rows.expect("copied transfers upload every token-major request's rows");
        let identity = weighted_f32(rows, &Tensor::from_slice(weights).to_device(device).view([-1, 1]));
        Some(Finished::OnDevice(match sum.total {
            Some(total) => total + identity,
            None => identity,
        }))
    }
}

/// `rows · weights` (a weight per row) in f32, as one new tensor: rows of another dtype are
/// converted into it and scaled in place, rather than converted into one tensor and multiplied
/// into a second (a full-size temporary less per token-major sum).
fn weighted_f32(rows: &Tensor, weights: &Tensor) -> Tensor {
    if rows.kind() == Kind::Float {
        return rows * weights;
    }
    let mut scaled = rows.to_kind(Kind::Float);
    scaled *= weights;
    scaled
}

#[cfg(test)]
mod tests {
    use switchyard_proto::wire::encode_rows;

    use super::*;
    use crate::staging::Staging;
    use crate::step::{tch_kind, wire_rows};

    const WIDTH: usize = 136;

    /// Values over many binades, with ties and near-ties of every dtype's rounding among them.
    fn spread_values(tokens: usize) -> Vec<f32> {
        (0..tokens * WIDTH)
            .map(|i| {
                let mantissa = (i as u32).wrapping_mul(2_654_435_761) >> 9;
                let exponent = 120 + (i % 14) as u32;
                let sign = ((i % 3 == 0) as u32) << 31;
                f32::from_bits(sign | (exponent << 23) | mantissa)
            })
            .collect()
    }

    /// `values` as the rows of a token-major request, their bytes at an odd address when
    /// `misaligned` (as a field inside a received frame may be).
    fn shared_rows(values: &[f32], dtype: WireDtype, misaligned: bool, parts: usize) -> Arc<SharedRows> {
        let encoded = encode_rows(values, WIDTH, dtype);
        let data = match misaligned {
            false => encoded,
            true => Bytes::from([&[0u8][..], &encoded].concat()).slice(1..),
        };
        Arc::new(SharedRows { data, dtype, tokens: values.len() / WIDTH, width: WIDTH, parts })
    }

    fn bytes_of(tensor: &Tensor) -> Vec<u8> {
        Vec::<u8>::try_from(tensor.contiguous().view_dtype(Kind::Uint8).view([-1])).expect("bytes")
    }

    /// libtorch's way: the rows viewed (FP8: dequantized) on the device, scaled in f32.
    fn torch_weighted(shared: &SharedRows, weights: &[f32]) -> Tensor {
        let staged = Tensor::from_slice(&shared.data[..]);
        let rows = wire_rows(&staged, 0, shared.dtype, shared.tokens, shared.width);
        weighted_f32(&rows, &Tensor::from_slice(weights).view([-1, 1]))
    }

    fn finish(sums: &mut Sums, gathered: &Gathered, part: Part, answer: WireDtype) -> Option<Finished> {
        sums.add(gathered, part, None, answer)
    }

    #[test]
    fn identity_sums_made_from_the_request_bytes_equal_libtorchs_bit_for_bit() {
        let values = spread_values(5);
        let dtypes = [WireDtype::F32, WireDtype::F16, WireDtype::Bf16, WireDtype::Fp8E4m3];
        for (dtype, misaligned) in dtypes.into_iter().flat_map(|dtype| [(dtype, false), (dtype, true)]) {
            let shared = shared_rows(&values, dtype, misaligned, 2);
            let first = Gathered { shared: shared.clone(), indices: vec![0, 1, 3], weights: vec![0.3, 1.7, -0.01] };
            let second = Gathered { shared: shared.clone(), indices: vec![1, 4], weights: vec![0.45, 2.5e-3] };
            let summed = [0.3, 1.7 + 0.45, 0.0, -0.01, 2.5e-3];
            let want = torch_weighted(&shared, &summed);
            for answer in [WireDtype::F32, WireDtype::F16, WireDtype::Bf16] {
                let mut sums = Sums::new(Device::Cpu, Transfers::InPlace);
                assert!(finish(&mut sums, &first, Part::Identity, answer).is_none(), "one part of two");
                let Some(Finished::Answer(have)) = finish(&mut sums, &second, Part::Identity, answer) else {
                    panic!("identity parts on a CPU finish as the answer's bytes");
                };
                assert_eq!(
                    &have[..],
                    bytes_of(&want.to_kind(tch_kind(answer))),
                    "{dtype} rows ({misaligned}), {answer}"
                );
                assert!(sums.is_empty());
            }
        }
    }

    /// Two requests' sums in progress at once each get only their own parts; a sum whose request
    /// is gone (no queued part holds its rows) is forgotten, the other kept.
    #[test]
    fn sums_in_progress_stay_apart_and_those_of_gone_requests_are_forgotten() {
        let values = spread_values(3);
        let (first, second) =
            (shared_rows(&values, WireDtype::F32, false, 2), shared_rows(&values, WireDtype::F32, false, 2));
        let part = |shared: &Arc<SharedRows>, index: i64, weight: f32| Gathered {
            shared: shared.clone(),
            indices: vec![index],
            weights: vec![weight],
        };
        let mut sums = Sums::new(Device::Cpu, Transfers::InPlace);
        for (gathered, answer) in [(part(&first, 0, 1.0), WireDtype::F32), (part(&second, 1, 2.0), WireDtype::F32)] {
            assert!(finish(&mut sums, &gathered, Part::Identity, answer).is_none());
        }
        let Some(Finished::Answer(have)) = finish(&mut sums, &part(&second, 2, 0.5), Part::Identity, WireDtype::F32)
        else {
            panic!("the second request's last part finishes its sum");
        };
        assert_eq!(&have[..], bytes_of(&torch_weighted(&second, &[0.0, 2.0, 0.5])), "none of the first's part");

        let third = shared_rows(&values, WireDtype::F32, false, 2);
        assert!(finish(&mut sums, &part(&third, 0, 1.0), Part::Identity, WireDtype::F32).is_none());
        assert_eq!(sums.len(), 2);
        drop(first);
        sums.forget_orphans();
        assert_eq!(sums.len(), 1, "the first request's sum is forgotten, the third's kept");
        assert!(!sums.is_empty());
        let Some(Finished::Answer(have)) = finish(&mut sums, &part(&third, 1, 1.0), Part::Identity, WireDtype::F32)
        else {
            panic!("the third request's sum is still there to finish");
        };
        assert_eq!(&have[..], bytes_of(&torch_weighted(&third, &[1.0, 1.0, 0.0])));
        assert!(sums.is_empty());
    }

    /// The views a CUDA step takes of its upload hold what the host tensors hold (shown here on a
    /// CPU, where the same views of a host upload are taken).
    #[test]
    fn a_part_s_indices_and_weights_staged_with_the_rows_equal_its_own() {
        let shared = shared_rows(&spread_values(6), WireDtype::Bf16, false, 1);
        let gathered = Gathered { shared, indices: vec![5, 0, 3], weights: vec![0.25, -1.5, 3.0] };
        let mut staging = Staging::new(Device::Cpu, Transfers::InPlace);
        let [indices, weights] = GatherIndex::uploads(&gathered);
        // An odd-sized run before them: each run still starts aligned for its element type.
        let (staged, offsets) = staging.upload(&[vec![&[1u8; 3][..]], indices, weights]);
        let (have, want) = (GatherIndex::staged(&staged, &offsets[1..], &gathered), GatherIndex::on_host(&gathered));
        assert_eq!(Vec::<i64>::try_from(&have.indices).expect("i64"), [5, 0, 3]);
        assert_eq!(have.weights.size(), [3, 1]);
        assert_eq!(bytes_of(&have.weights), bytes_of(&want.weights));
        assert_eq!(bytes_of(&have.indices), bytes_of(&want.indices));
    }

    #[test]
    fn a_sum_of_computed_and_identity_parts_adds_both() {
        let values = spread_values(4);
        let shared = shared_rows(&values, WireDtype::Bf16, true, 2);
        let computed = Gathered { shared: shared.clone(), indices: vec![0, 2], weights: vec![0.5, 0.25] };
        let identity = Gathered { shared: shared.clone(), indices: vec![2, 3], weights: vec![0.125, 0.75] };
        let outputs = Tensor::from_slice(&spread_values(2)).view([2, WIDTH as i64]) * 3.0;

        let mut sums = Sums::new(Device::Cpu, Transfers::InPlace);
        let index = GatherIndex::on_host(&computed);
        assert!(finish(&mut sums, &computed, Part::Rows(&outputs, &index), WireDtype::F32).is_none());
        let Some(Finished::OnDevice(have)) = finish(&mut sums, &identity, Part::Identity, WireDtype::F32) else {
            panic!("a sum with computed parts finishes on the device");
        };
        let mut want = Tensor::zeros([4, WIDTH as i64], (Kind::Float, Device::Cpu));
        let _ = want.index_add_(
            0,
            &Tensor::from_slice(&[0i64, 2]),
            &(&outputs * Tensor::from_slice(&[0.5f32, 0.25]).view([-1, 1])),
        );
        let want = want + torch_weighted(&shared, &[0.0, 0.0, 0.125, 0.75]);
        assert_eq!(bytes_of(&have), bytes_of(&want));
    }
}
