//! The libtorch work of one compute step: every batch's rows to the device in one upload, each
//! expert's forward on its rows, every answer back in one download.
//!
//! A batch's entries come in two kinds. Expert-major entries carry their own rows and get their
//! output rows back. Token-major entries ([`Gathered`]) select their rows from their request's
//! shared rows (uploaded once per step however many experts use them) and add their gate-weighted
//! outputs into the request's per-token sum ([`Sums`]), which comes back as that entry's
//! `combined` answer once its last expert has run.
//!
//! With `--grouped-experts`, the batches of experts that share a stack ([`Stacks`]) are computed
//! together: their rows joined in slot order, one grouped product per matrix.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use switchyard_experts::{Expert, kind_of};
use switchyard_model::ExpertId;
use switchyard_proto::wire::{FP8_BLOCK, WireDtype};
use tch::{Kind, Tensor};

use crate::request::{Gathered, RowsSource, SharedRows};
use crate::scheduler::{Batch, QueuedRows};
use crate::stacks::Stacks;
use crate::staging::{Staging, Transfers};
use crate::sums::{Finished, GatherIndex, Part, Sums, key_of};

/// The tch kind of a dtype's values (FP8 rows also carry scales, which `wire_rows` applies).
pub fn tch_kind(dtype: WireDtype) -> Kind {
    match dtype {
        WireDtype::F16 => Kind::Half,
        WireDtype::Bf16 => Kind::BFloat16,
        WireDtype::F32 => Kind::Float,
        WireDtype::Fp8E4m3 => Kind::Float8e4m3fn,
    }
}

/// One entry's answer: its own output rows (empty for a token-major entry), and its request's
/// per-token sum when this entry completed it.
#[derive(Debug, Default)]
pub struct EntryAnswer {
    pub data: Bytes,
    pub combined: Option<Bytes>,
}

/// Where an entry's finished sum is once the step's downloads are in.
enum SumAnswer {
    /// The next download, of this many bytes.
    Downloaded(usize),
    Ready(Bytes),
}

/// The key of a token-major part's [`GatherIndex`] in the step: the part's own address.
fn gathered_key(gathered: &Gathered) -> usize {
    std::ptr::from_ref(gathered) as usize
}

/// `rows` wire rows of `dtype` and width `d_model` at byte `offset` of the staged `u8` tensor, as
/// a `[rows, d_model]` tensor on its device: a view for f32, f16 and bf16; for FP8, the codes
/// times their block scales (in f32), computed where the rows are.
pub(crate) fn wire_rows(staged: &Tensor, offset: usize, dtype: WireDtype, rows: usize, d_model: usize) -> Tensor {
    let (rows, width, row_bytes) = (rows as i64, d_model as i64, dtype.row_bytes(d_model) as i64);
    let bytes = staged.narrow(0, offset as i64, rows * row_bytes);
    if dtype != WireDtype::Fp8E4m3 {
        return bytes.view_dtype(tch_kind(dtype)).view([rows, width]);
    }
    let bytes = bytes.view([rows, row_bytes]);
    let values = bytes.narrow(1, 0, width).view_dtype(Kind::Float8e4m3fn).to_kind(Kind::Float);
    let blocks = d_model.div_ceil(FP8_BLOCK) as i64;
    let scales = bytes.narrow(1, width, 4 * blocks).contiguous().view_dtype(Kind::Float);
    values * scales.repeat_interleave_self_int(FP8_BLOCK as i64, 1, None).narrow(1, 0, width)
}

/// How one batch's input is laid out: runs of consecutive own-row entries of one wire dtype
/// (viewed in place as one tensor), and token-major entries (selected from their shared rows).
enum Piece<'a> {
    Own {
        entries: Vec<&'a QueuedRows>,
        upload: usize,
    },
    /// `index_upload`: where the upload carries the part's indices and weights (copied transfers).
    Gathered {
        gathered: &'a Gathered,
        index_upload: Option<usize>,
    },
}

impl Piece<'_> {
    fn tokens(&self) -> usize {
        match self {
            Piece::Own { entries, .. } => entries.iter().map(|entry| entry.tokens).sum(),
            Piece::Gathered { gathered, .. } => gathered.indices.len(),
        }
    }
}

/// Batches of experts in one stack, computed in one grouped product: each batch's index in the
/// step with its rows in the joined rows, in slot order, and where each slot's rows end.
struct GroupedBatches {
    stack: usize,
    batches: Vec<(usize, Range<i64>)>,
    ends: Vec<i32>,
}

/// The step's batches that share a stack with another of its batches, by stack.
fn grouped_batches(stacks: &Stacks, batches: &[Batch]) -> Vec<GroupedBatches> {
    let mut by_stack: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
    for (index, batch) in batches.iter().enumerate() {
        if let Some((stack, slot)) = stacks.slot(&batch.expert) {
            by_stack.entry(stack).or_default().push((slot, index));
        }
    }
    by_stack
        .into_iter()
        .filter(|(_, members)| members.len() > 1)
        .map(|(stack, mut members)| {
            members.sort_unstable();
            let mut rows = vec![0; stacks.stack(stack).len()];
            for &(slot, index) in &members {
                rows[slot] += batches[index].tokens();
            }
            let ends = rows
                .iter()
                .scan(0, |end, rows| {
                    *end += rows;
                    Some(i32::try_from(*end).expect("a step's rows are counted in i32"))
                })
                .collect();
            let batch_rows = members
                .into_iter()
                .scan(0, |start, (_, index)| {
                    let rows = *start..*start + batches[index].tokens() as i64;
                    *start = rows.end;
                    Some((index, rows))
                })
                .collect();
            GroupedBatches { stack, batches: batch_rows, ends }
        })
        .collect()
}

/// What a step computed: each batch's answers, entry by entry, how many of its batches were
/// computed in grouped products, and how many bytes its upload held.
pub struct Computed {
    pub answers: Vec<Vec<EntryAnswer>>,
    pub grouped_batches: usize,
    pub staged_bytes: usize,
}

/// The step's libtorch work.
pub fn compute_step(
    experts: &HashMap<ExpertId, Expert>,
    stacks: &Stacks,
    batches: &[Batch],
    staging: &mut Staging,
    sums: &mut Sums,
) -> Computed {
    let grouped = grouped_batches(stacks, batches);
    let copied = staging.transfers() == Transfers::Copied;
    let mut uploads: Vec<Vec<&[u8]>> = Vec::new();
    let mut shared_uploads: HashMap<usize, (usize, &Arc<SharedRows>)> = HashMap::new();
    let pieces: Vec<Vec<Piece>> = batches
        .iter()
        .map(|batch| {
            // In place, the parts of an identity expert's batch of token-major entries only are
            // summed from the requests' bytes (`Sums::add`), not from uploaded rows.
            let uploads_shared = copied || !identity_parts_only(experts, batch);
            let mut pieces: Vec<Piece> = Vec::new();
            for (entry, _) in &batch.entries {
                match &entry.rows {
                    RowsSource::Own(data) => match pieces.last_mut() {
                        Some(Piece::Own { entries, upload }) if entries[0].dtype == entry.dtype => {
                            entries.push(entry);
                            uploads[*upload].push(data);
                        }
                        _ => {
                            pieces.push(Piece::Own { entries: vec![entry], upload: uploads.len() });
                            uploads.push(vec![data]);
                        }
                    },
                    RowsSource::Gathered(gathered) => {
                        if uploads_shared {
                            shared_uploads.entry(key_of(&gathered.shared)).or_insert_with(|| {
                                uploads.push(vec![&gathered.shared.data]);
                                (uploads.len() - 1, &gathered.shared)
                            });
                        }
                        let index_upload = (copied && !identity_parts_only(experts, batch)).then(|| {
                            uploads.extend(GatherIndex::uploads(gathered));
                            uploads.len() - 2
                        });
                        pieces.push(Piece::Gathered { gathered, index_upload });
                    }
                }
            }
            pieces
        })
        .collect();
    // Copied, the grouped products' row ends travel in the upload too (see `GatherIndex`).
    let ends_uploads: Vec<Option<usize>> = grouped
        .iter()
        .map(|group| {
            copied.then(|| {
                uploads.push(vec![bytemuck::cast_slice(&group.ends)]);
                uploads.len() - 1
            })
        })
        .collect();
    let started = Instant::now();
    let (staged, offsets) = staging.upload(&uploads);
    let staged_bytes = staged.numel();
    let uploaded = Instant::now();
    let shared_rows: HashMap<usize, Tensor> = shared_uploads
        .iter()
        .map(|(key, (upload, shared))| {
            (*key, wire_rows(&staged, offsets[*upload], shared.dtype, shared.tokens, shared.width))
        })
        .collect();
    // Identity-only batches sum from the request's rows (a CPU) or their own weights: no index.
    let gather_indices: HashMap<usize, GatherIndex> = batches
        .iter()
        .zip(&pieces)
        .filter(|(batch, _)| !identity_parts_only(experts, batch))
        .flat_map(|(_, pieces)| pieces)
        .filter_map(|piece| match piece {
            Piece::Gathered { gathered, index_upload } => {
                let index = match index_upload {
                    Some(upload) => GatherIndex::staged(&staged, &offsets[*upload..*upload + 2], gathered),
                    None => GatherIndex::on_host(gathered),
                };
                Some((gathered_key(gathered), index))
            }
            Piece::Own { .. } => None,
        })
        .collect();
    let staged_rows = Staged { rows: &staged, offsets: &offsets, shared: &shared_rows, indices: &gather_indices };

    let computed = compute_grouped(&grouped, &ends_uploads, stacks, batches, &pieces, &staged_rows);
    let grouped_launched = Instant::now();
    let mut downloads = Vec::new();
    let mut sizes: Vec<Vec<(usize, Option<SumAnswer>)>> = Vec::with_capacity(batches.len());
    // How long the host took over each batch's launches: on a GPU, where one waits for the device.
    // Kept only for the debug event below.
    let timing_batches = tracing::enabled!(tracing::Level::DEBUG);
    let mut batch_launches_us: Vec<u64> = Vec::with_capacity(if timing_batches { batches.len() } else { 0 });
    for ((batch, pieces), computed) in batches.iter().zip(&pieces).zip(computed) {
        let batch_started = Instant::now();
        let expert = &experts[&batch.expert];
        let _entered = batch_span(batch).entered();
        if identity_parts_only(experts, batch) {
            sizes.push(queue_answers(None, batch, sums, &staged_rows, &mut downloads));
            continue;
        }
        let output = computed.unwrap_or_else(|| expert.forward(&batch_input(pieces, batch, expert, &staged_rows)));
        sizes.push(queue_answers(Some(&output), batch, sums, &staged_rows, &mut downloads));
        if timing_batches {
            batch_launches_us.push(batch_started.elapsed().as_micros() as u64);
        }
    }
    let launched = Instant::now();
    let mut host = staging.download(&downloads);
    // Where a step's time goes, for whoever tunes a device: packing and queueing the upload, the
    // experts' launches (on a GPU also every wait for the device between them: the grouped
    // products', then each batch's in step order), and the download (on a GPU: the kernels' tail,
    // the copy and its landing in host memory).
    let grouped_batches = grouped.iter().map(|group| group.batches.len()).sum();
    tracing::debug!(
        batches = batches.len(),
        grouped_batches,
        staged_bytes,
        upload_us = (uploaded - started).as_micros() as u64,
        kernels_us = (launched - uploaded).as_micros() as u64,
        grouped_us = (grouped_launched - uploaded).as_micros() as u64,
        batch_launches_us = ?batch_launches_us,
        download_us = launched.elapsed().as_micros() as u64,
        "step phases"
    );
    let mut take = |size: usize| host.take(size);
    let answers = sizes
        .into_iter()
        .map(|sizes| {
            sizes
                .into_iter()
                .map(|(data, combined)| EntryAnswer {
                    data: take(data),
                    combined: combined.map(|sum| match sum {
                        SumAnswer::Downloaded(size) => take(size),
                        SumAnswer::Ready(answer) => answer,
                    }),
                })
                .collect()
        })
        .collect();
    Computed { answers, grouped_batches, staged_bytes }
}

/// Each grouped batch's output rows (`None` for the others): per group, its batches' rows joined
/// in slot order through the stack's grouped products, with the row ends where `ends_uploads` put
/// them in the upload (copied transfers) or made on the host.
fn compute_grouped(
    grouped: &[GroupedBatches],
    ends_uploads: &[Option<usize>],
    stacks: &Stacks,
    batches: &[Batch],
    pieces: &[Vec<Piece>],
    staged: &Staged,
) -> Vec<Option<Tensor>> {
    let mut computed: Vec<Option<Tensor>> = batches.iter().map(|_| None).collect();
    for (group, upload) in grouped.iter().zip(ends_uploads) {
        let stack = stacks.stack(group.stack);
        let _entered = tracing::info_span!("grouped_experts", batches = group.batches.len()).entered();
        let ends = match upload {
            Some(upload) => {
                staged.rows.narrow(0, staged.offsets[*upload] as i64, 4 * group.ends.len() as i64).view_dtype(Kind::Int)
            }
            None => Tensor::from_slice(&group.ends),
        };
        let total_rows = group.batches.last().map_or(0, |(_, rows)| rows.end);
        let d_model = batches[group.batches[0].0].d_model as i64;
        let joined = Tensor::empty([total_rows, d_model], (kind_of(stack.shape().dtype), staged.rows.device()));
        for (index, rows) in &group.batches {
            write_batch_input(&pieces[*index], &batches[*index], staged, &joined.slice(0, rows.start, rows.end, 1));
        }
        let output = stack.forward(&joined, &ends);
        for (index, rows) in &group.batches {
            computed[*index] = Some(output.slice(0, rows.start, rows.end, 1));
        }
    }
    computed
}

/// A step's uploaded rows: the staged tensor, where each upload starts in it, and the token-major
/// requests' shared rows viewed in it (by [`key_of`]).
struct Staged<'a> {
    rows: &'a Tensor,
    offsets: &'a [usize],
    shared: &'a HashMap<usize, Tensor>,
    /// Each token-major part's indices and weights, by [`gathered_key`].
    indices: &'a HashMap<usize, GatherIndex>,
}

impl Staged<'_> {
    /// A token-major part's request rows and its token indices into them, both on the device.
    fn gathered(&self, gathered: &Gathered) -> (&Tensor, &Tensor) {
        (&self.shared[&key_of(&gathered.shared)], &self.indices[&gathered_key(gathered)].indices)
    }
}

/// The span of one expert's batch: a child of its first request's span (one trace from the client
/// to the expert) that follows from the others it merged.
fn batch_span(batch: &Batch) -> tracing::Span {
    let first = batch.entries.first().map(|(entry, _)| &entry.request_span);
    let span = tracing::info_span!(
        parent: first.and_then(tracing::Span::id),
        "expert_batch",
        expert = %batch.expert,
        tokens = batch.tokens(),
        request_ids = %batch.request_ids(),
    );
    for (entry, _) in batch.entries.iter().skip(1) {
        span.follows_from(&entry.request_span);
    }
    span
}

/// One batch's input rows on the device: its piece viewed in the upload (own rows) or selected
/// from its request's shared rows (token-major), or its pieces joined in the expert's dtype.
fn batch_input(pieces: &[Piece], batch: &Batch, expert: &Expert, staged: &Staged) -> Tensor {
    if let [only] = pieces {
        return piece_rows(only, batch, staged);
    }
    let joined =
        Tensor::empty([batch.tokens() as i64, batch.d_model as i64], (kind_of(expert.dtype()), staged.rows.device()));
    write_batch_input(pieces, batch, staged, &joined);
    joined
}

/// Writes one batch's input rows into `into` (`[batch rows, d_model]`, in its own dtype): each
/// token-major piece selected straight into its place where the dtypes agree, so joining the rows
/// of several pieces or batches costs no copy beyond the selection.
fn write_batch_input(pieces: &[Piece], batch: &Batch, staged: &Staged, into: &Tensor) {
    let mut start = 0;
    for piece in pieces {
        let rows = piece.tokens() as i64;
        let mut place = into.narrow(0, start, rows);
        match piece {
            Piece::Gathered { gathered, .. } => {
                let (shared, indices) = staged.gathered(gathered);
                if shared.kind() == into.kind() {
                    let _selected = shared.index_select_out(&place, 0, indices);
                } else {
                    place.copy_(&shared.index_select(0, indices));
                }
            }
            Piece::Own { .. } => place.copy_(&piece_rows(piece, batch, staged)),
        }
        start += rows;
    }
}

/// One piece's rows on the device, in their wire dtype (FP8 dequantized): a view of the upload
/// for own rows, a selection from the request's shared rows for a token-major part.
fn piece_rows(piece: &Piece, batch: &Batch, staged: &Staged) -> Tensor {
    match piece {
        Piece::Own { entries, upload } => {
            wire_rows(staged.rows, staged.offsets[*upload], entries[0].dtype, piece.tokens(), batch.d_model)
        }
        Piece::Gathered { gathered, .. } => {
            let (shared, indices) = staged.gathered(gathered);
            shared.index_select(0, indices)
        }
    }
}

/// Whether `batch` is an identity expert's with token-major entries only: nothing to compute, each
/// entry's part is its rows.
fn identity_parts_only(experts: &HashMap<ExpertId, Expert>, batch: &Batch) -> bool {
    experts[&batch.expert].is_identity()
        && batch.entries.iter().all(|(entry, _)| matches!(entry.rows, RowsSource::Gathered(_)))
}

/// Queues `output`'s rows for download as flat `u8` tensors in each entry's output dtype (one
/// conversion for the whole batch when every entry has its own rows and one output dtype, as is
/// usual), adds token-major entries' rows into their sums, and queues each sum its entry finished.
/// `output` is `None` for an identity expert's batch of token-major entries only: their parts are
/// their input rows. Returns each entry's (own answer, finished sum) sizes in bytes, in download
/// order.
fn queue_answers(
    output: Option<&Tensor>,
    batch: &Batch,
    sums: &mut Sums,
    staged: &Staged,
    downloads: &mut Vec<Tensor>,
) -> Vec<(usize, Option<SumAnswer>)> {
    let as_bytes =
        |rows: &Tensor, dtype: WireDtype| rows.to_kind(tch_kind(dtype)).contiguous().view_dtype(Kind::Uint8).view([-1]);
    let own_size = |entry: &QueuedRows| match entry.rows {
        RowsSource::Own(_) => entry.tokens * batch.d_model * entry.output_dtype.element_size(),
        RowsSource::Gathered(_) => 0,
    };
    let first_dtype = batch.entries[0].0.output_dtype;
    let uniform = batch
        .entries
        .iter()
        .all(|(entry, _)| entry.output_dtype == first_dtype && matches!(entry.rows, RowsSource::Own(_)));
    if let (true, Some(output)) = (uniform, output) {
        downloads.push(as_bytes(output, first_dtype));
        return batch.entries.iter().map(|(entry, _)| (own_size(entry), None)).collect();
    }
    let mut start = 0;
    let mut sizes = Vec::with_capacity(batch.entries.len());
    for (entry, _) in &batch.entries {
        let rows = output.map(|output| output.narrow(0, start, entry.tokens as i64));
        start += entry.tokens as i64;
        match (&entry.rows, &rows) {
            (RowsSource::Own(_), Some(rows)) => {
                downloads.push(as_bytes(rows, entry.output_dtype));
                sizes.push((own_size(entry), None));
            }
            (RowsSource::Own(_), None) => unreachable!("a batch with own rows is computed"),
            (RowsSource::Gathered(gathered), rows) => {
                let part = match rows {
                    Some(rows) => Part::Rows(rows, &staged.indices[&gathered_key(gathered)]),
                    None => Part::Identity,
                };
                let shared_rows = staged.shared.get(&key_of(&gathered.shared));
                let finished = sums.add(gathered, part, shared_rows, entry.output_dtype).map(|sum| match sum {
                    Finished::Answer(answer) => SumAnswer::Ready(answer),
                    Finished::OnDevice(total) => {
                        downloads.push(as_bytes(&total, entry.output_dtype));
                        let shared = &gathered.shared;
                        SumAnswer::Downloaded(shared.tokens * shared.width * entry.output_dtype.element_size())
                    }
                });
                sizes.push((0, finished));
            }
        }
    }
    sizes
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    /// A batch of `expert` merging entries of `tokens` rows each (their rows are not read).
    fn batch(expert: ExpertId, tokens: &[usize]) -> Batch {
        Batch { expert, d_model: 16, entries: tokens.iter().map(|&tokens| QueuedRows::unread(tokens)).collect() }
    }

    /// Layer 0's experts 0 and 2 have rows in the step: one grouped product, expert 0's rows first
    /// (slot order, not the step's), each slot's end counting every entry's rows, the slots without
    /// rows ending where the one before them does. Layer 1's stack has one batch: it computes alone.
    #[test]
    fn batches_of_one_stack_go_together_in_slot_order_with_their_row_ends() {
        let spec =
            switchyard_model::ModelSpec { d_model: 16, d_ff: 24, ..switchyard_model::ModelSpec::default_synthetic() };
        let mut experts: HashMap<ExpertId, Expert> = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
            .into_iter()
            .map(|(layer, expert)| {
                let id = ExpertId::new(layer, expert);
                (id, Expert::synthetic(&spec, layer, expert, Device::Cpu, switchyard_model::WeightDtype::F32))
            })
            .collect();
        let mut stacks = Stacks::new(true);
        stacks.restack(0, &mut experts);
        stacks.restack(1, &mut experts);
        let batches =
            [batch(ExpertId::new(0, 2), &[1, 2]), batch(ExpertId::new(0, 0), &[4]), batch(ExpertId::new(1, 0), &[5])];
        let grouped = grouped_batches(&stacks, &batches);
        assert_eq!(grouped.len(), 1);
        let group = &grouped[0];
        assert_eq!(stacks.slot(&ExpertId::new(0, 0)).map(|(stack, _)| stack), Some(group.stack));
        assert_eq!(group.batches, [(1, 0..4), (0, 4..7)], "each batch's rows in the joined rows");
        assert_eq!(group.ends, [4, 4, 7, 7]);
    }
}
