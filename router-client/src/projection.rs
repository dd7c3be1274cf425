//! `x · Wᵀ` for the gate's weight matrices (router, noise, Soft MoE slots, shared-expert gates):
//! one GEMM per call with the `gemm` crate's kernels, split over threads when large.
//!
//! The weights are stored transposed, `[d_model, rows]`, once when the gate is built: in that
//! layout gemm reads them in place, where a row-major `W` was packed again by every call (and by
//! every thread of a split call). On DeepEP's low-latency router (128 tokens, 7168 x 256) on one
//! core of this project's 2-core Xeon VM (AVX-512): 150-156 GFLOP/s, against 119-127 for
//! matrixmultiply on row-major weights and 139-148 for libtorch's f32 GEMM; at 4096 tokens 160-172,
//! 125-132 and 147-158 (the mean of 100 and of 10 products, in two runs).

use ndarray::{ArrayView2, ArrayViewMut2, Axis};

use crate::cpu::{CHUNKS_PER_THREAD, in_turns};

/// A weight matrix `W [rows, d_model]`, ready to multiply by tokens' hidden states.
#[derive(Debug, Clone)]
pub struct Projection {
    rows: usize,
    d_model: usize,
    /// `Wᵀ`, row-major: `transposed[k * rows + r] = W[r, k]`.
    transposed: Vec<f32>,
}

impl Projection {
    /// From row-major `weights [rows, d_model]`.
    pub fn new(weights: &[f32], rows: usize, d_model: usize) -> Self {
        assert_eq!(weights.len(), rows * d_model, "weights must be [rows, d_model]");
        let mut transposed = vec![0.0; weights.len()];
        for (r, row) in weights.chunks_exact(d_model.max(1)).enumerate() {
            for (k, weight) in row.iter().enumerate() {
                transposed[k * rows + r] = *weight;
            }
        }
        Self { rows, d_model, transposed }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Each row of `W` `times` times in a row: `[rows * times, d_model]` (a router row per slot).
    pub fn repeat_rows(&self, times: usize) -> Self {
        let transposed = self
            .transposed
            .chunks_exact(self.rows.max(1))
            .flat_map(|column| column.iter().flat_map(move |weight| std::iter::repeat_n(*weight, times)))
            .collect();
        Self { rows: self.rows * times, d_model: self.d_model, transposed }
    }

    /// Writes `hidden · Wᵀ`, `[tokens, rows]`, for row-major `hidden [tokens, d_model]` into `out`.
    /// A large product is split over up to `threads` threads scoped to this call (its own among
    /// them), each value the same sum in the same order however the product is split ([`product_threads`]).
    pub fn project_into(&self, hidden: &[f32], out: &mut Vec<f32>, threads: usize) {
        let (rows, d_model) = (self.rows, self.d_model);
        let tokens = hidden.len().checked_div(d_model).unwrap_or(0);
        out.clear();
        out.resize(tokens * rows, 0.0);
        let hidden = ArrayView2::from_shape((tokens, d_model), &hidden[..tokens * d_model]).expect(SHAPE_ERROR);
        let weights = ArrayView2::from_shape((d_model, rows), &self.transposed[..]).expect(SHAPE_ERROR);
        let mut out = ArrayViewMut2::from_shape((tokens, rows), &mut out[..]).expect(SHAPE_ERROR);
        match Split::of(tokens, rows, d_model, threads) {
            Split::Whole => product(hidden, weights, out),
            Split::Tokens { chunk, threads } => {
                let chunks = hidden.axis_chunks_iter(Axis(0), chunk).zip(out.axis_chunks_iter_mut(Axis(0), chunk));
                in_turns(threads, chunks, |(hidden, out)| product(hidden, weights, out));
            }
            Split::Rows { chunk, threads } => {
                let chunks = weights.axis_chunks_iter(Axis(1), chunk).zip(out.axis_chunks_iter_mut(Axis(1), chunk));
                in_turns(threads, chunks, |(weights, out)| product(hidden, weights, out));
            }
        }
    }
}

const SHAPE_ERROR: &str = "shapes follow from the slice lengths";

/// Products of at least this many multiply-adds are split over threads: ~2 ms of one core's
/// work, against the ~50-100 µs that starting and joining a thread costs on a small VM.
const SPLIT_MULTIPLY_ADDS: usize = 1 << 26;

/// ... or whose longer side's values, the part each thread reads alone, are this many bytes or
/// more. A router of few rows does few multiply-adds per value it reads, and streams the tokens'
/// hidden states by at ~11 GB/s on one core of the development VM: Mixtral's 8-row router on 1024
/// tokens (33.5 million multiply-adds, 16.8 MB of hidden states) took 1.53 ms on one thread,
/// and on 4096 tokens 7.0 ms on one and 3.6 ms on two (`examples/gate_product.rs`).
const SPLIT_READ_BYTES: usize = 4 << 20;

/// How a `[tokens, d_model] · [d_model, rows]` product is shared among threads: its longer side
/// in chunks (each thread then reads all of the shorter one: with few tokens, as in a low-latency
/// call, the tokens), the last one shorter, that the threads take in turns.
#[derive(Debug, PartialEq, Eq)]
enum Split {
    Whole,
    /// Chunks of this many tokens, on this many threads.
    Tokens {
        chunk: usize,
        threads: usize,
    },
    /// Chunks of this many rows, on this many threads.
    Rows {
        chunk: usize,
        threads: usize,
    },
}

impl Split {
    /// As many threads as the product is worth by its multiply-adds or by the values each reads,
    /// at most `threads`, and as many chunks, up to [`CHUNKS_PER_THREAD`] each, as keep every
    /// chunk's sums in the whole product's order ([`SumOrder`]).
    fn of(tokens: usize, rows: usize, d_model: usize, threads: usize) -> Self {
        let (long, short) = (tokens.max(rows), tokens.min(rows));
        let read_bytes = long * d_model * std::mem::size_of::<f32>();
        let worth = (tokens * rows * d_model / SPLIT_MULTIPLY_ADDS).max(read_bytes / SPLIT_READ_BYTES).max(1);
        let most = threads.min(worth).min(long);
        let Some(threads) = (2..=most).rev().find(|&parts| split_keeps_sum_order(long, short, parts)) else {
            return Split::Whole;
        };
        let chunks = (threads..=threads * CHUNKS_PER_THREAD)
            .rev()
            .find(|&chunks| split_keeps_sum_order(long, short, chunks))
            .unwrap_or(threads);
        let chunk = long.div_ceil(chunks);
        if tokens >= rows { Split::Tokens { chunk, threads } } else { Split::Rows { chunk, threads } }
    }

    fn threads(&self) -> usize {
        match *self {
            Split::Whole => 1,
            Split::Tokens { threads, .. } | Split::Rows { threads, .. } => threads,
        }
    }
}

/// The threads a `[tokens, d_model] · [d_model, rows]` product uses when up to `threads` may.
pub fn product_threads(tokens: usize, rows: usize, d_model: usize, threads: usize) -> usize {
    Split::of(tokens, rows, d_model, threads).threads()
}

/// How gemm orders the sum behind each value: it depends on the product's shape, so a part of a
/// split product sums in the whole's order only if its shape is of the same kind. Within
/// [`SumOrder::Blocked`], each value is a run of multiply-adds over each block of `d_model`, the
/// blocks' depth set by `d_model` and the caches alone.
#[derive(Debug, PartialEq, Eq)]
enum SumOrder {
    /// One token or one row: matrix-vector loops.
    Vector,
    /// Both sides at most 64: a single block depth of at most 512.
    Small,
    Blocked,
}

fn sum_order(long: usize, short: usize) -> SumOrder {
    match (long, short) {
        (_, 0..=1) => SumOrder::Vector,
        (0..=64, _) => SumOrder::Small,
        _ => SumOrder::Blocked,
    }
}

/// Whether `long` split into `parts` (chunks of `long.div_ceil(parts)`, the last one shorter)
/// leaves every part summing in the whole product's order. A matrix-vector product is not split.
fn split_keeps_sum_order(long: usize, short: usize, parts: usize) -> bool {
    let whole = sum_order(long, short);
    let per_part = long.div_ceil(parts);
    let last = long - per_part * (long.div_ceil(per_part) - 1);
    whole != SumOrder::Vector
        && [per_part, last].into_iter().all(|part| sum_order(part.max(short), part.min(short)) == whole)
}

/// `out = hidden · weights` for `hidden [tokens, d_model]`, `weights [d_model, cols]` and
/// `out [tokens, cols]`, each with any strides (a part of a split product is a block of the whole).
#[allow(unsafe_code)]
fn product(hidden: ArrayView2<f32>, weights: ArrayView2<f32>, mut out: ArrayViewMut2<f32>) {
    let ((tokens, d_model), cols) = (hidden.dim(), weights.ncols());
    assert_eq!(weights.nrows(), d_model, "weights must be [d_model, cols]");
    assert_eq!(out.dim(), (tokens, cols), "out must be [tokens, cols]");
    let (out_strides, hidden_strides, weight_strides) = (out.strides(), hidden.strides(), weights.strides());
    let (out_rows, out_cols) = (out_strides[0], out_strides[1]);
    // SAFETY: each pointer comes with its view's strides and gemm is told the views' shapes, so it
    // reads and writes only elements of those views (none when `tokens` or `cols` is 0: gemm
    // returns before touching memory); `out` is borrowed mutably here, so nothing else
    // touches its elements meanwhile; `read_dst` is false, so out's previous values are not read.
    unsafe {
        gemm::gemm(
            tokens,
            cols,
            d_model,
            out.as_mut_ptr(),
            out_cols,
            out_rows,
            false,
            hidden.as_ptr(),
            hidden_strides[1],
            hidden_strides[0],
            weights.as_ptr(),
            weight_strides[1],
            weight_strides[0],
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-1, 1) that vary with `i` without a short period.
    fn spread(i: usize) -> f32 {
        ((i * 7919) % 1009) as f32 / 500.0 - 1.0
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|value| value.to_bits()).collect()
    }

    /// `hidden · weightsᵀ` one dot product at a time, in f64: `[tokens, rows]`.
    fn naive_products(hidden: &[f32], weights: &[f32], d_model: usize) -> Vec<f32> {
        hidden
            .chunks_exact(d_model)
            .flat_map(|token| {
                weights.chunks_exact(d_model).map(move |row| {
                    token.iter().zip(row).map(|(x, w)| f64::from(*x) * f64::from(*w)).sum::<f64>() as f32
                })
            })
            .collect()
    }

    fn assert_close(have: &[f32], want: &[f32], what: &str) {
        assert_eq!(have.len(), want.len(), "{what}");
        for (index, (have, want)) in have.iter().zip(want).enumerate() {
            assert!((have - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}[{index}]: {have} vs {want}");
        }
    }

    fn project(projection: &Projection, hidden: &[f32], threads: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; 3];
        projection.project_into(hidden, &mut out, threads);
        out
    }

    #[test]
    fn the_product_equals_the_dot_products_for_every_kind_of_shape() {
        // Odd sizes, no multiple of a SIMD width or a kernel block; one token, one row, small, blocked.
        for (tokens, rows, d_model) in [(37, 5, 19), (1, 7, 33), (9, 1, 33), (3, 2, 1), (70, 3, 600), (2, 130, 17)] {
            let hidden: Vec<f32> = (0..tokens * d_model).map(spread).collect();
            let weights: Vec<f32> = (0..rows * d_model).map(|i| spread(i + 13)).collect();
            let projection = Projection::new(&weights, rows, d_model);
            assert_eq!((projection.rows(), projection.d_model()), (rows, d_model));
            let want = naive_products(&hidden, &weights, d_model);
            assert_close(&project(&projection, &hidden, 1), &want, &format!("{tokens} x {rows} x {d_model}"));
        }
    }

    #[test]
    fn no_tokens_or_no_width_give_no_values_or_zeros() {
        let projection = Projection::new(&[1.0, 2.0, 3.0, 4.0], 2, 2);
        assert_eq!(project(&projection, &[], 4), Vec::<f32>::new());
        assert_eq!(project(&Projection::new(&[], 3, 0), &[], 4), Vec::<f32>::new());
        assert_eq!(project(&Projection::new(&[], 0, 2), &[1.0, 2.0], 4), Vec::<f32>::new());
    }

    #[test]
    fn repeated_rows_follow_each_other() {
        let projection = Projection::new(&[1.0, 0.0, 0.0, 2.0, -1.0, 1.0], 3, 2).repeat_rows(2);
        assert_eq!(projection.rows(), 6);
        assert_eq!(project(&projection, &[3.0, 4.0], 1), [3.0, 3.0, 8.0, 8.0, 1.0, 1.0]);
    }

    #[test]
    fn a_product_splits_its_longer_side() {
        assert_eq!(
            Split::of(128, 256, 7168, 8),
            Split::Rows { chunk: 22, threads: 3 },
            "DeepEP's low-latency router: ~235 M multiply-adds, 12 chunks of rows"
        );
        assert_eq!(Split::of(4096, 256, 7168, 8), Split::Tokens { chunk: 128, threads: 8 });
        assert_eq!(Split::of(300, 300, 7168, 2), Split::Tokens { chunk: 38, threads: 2 });
        assert_eq!(Split::of(300, 300, 7168, 1), Split::Whole);
        assert_eq!(product_threads(128, 256, 7168, 8), 3);
        assert_eq!(product_threads(10, 1000, 1 << 16, 4), 4, "1000 rows in parts of 250");
        assert_eq!(product_threads(1000, 10, 1 << 16, 3), 3, "1000 tokens in parts of 334, the last 332");
    }

    /// A router of few rows does little arithmetic per value it reads: its tokens' values decide.
    #[test]
    fn a_narrow_router_splits_by_the_hidden_states_it_reads() {
        // Mixtral: 33.5 million multiply-adds, under the arithmetic's threshold, over 16.8 MB.
        assert_eq!(Split::of(1024, 8, 4096, 2), Split::Tokens { chunk: 128, threads: 2 });
        // 16 chunks of 64 tokens would each sum as a small product: 13 of 79, the last of 76.
        assert_eq!(Split::of(1024, 8, 4096, 16), Split::Tokens { chunk: 79, threads: 4 }, "16 MiB: 4 threads");
        assert_eq!(Split::of(4096, 8, 4096, 16), Split::Tokens { chunk: 76, threads: 16 }, "64 MiB: 16 threads");
        assert_eq!(Split::of(4096, 8, 4096, 4), Split::Tokens { chunk: 256, threads: 4 });
        assert_eq!(Split::of(255, 8, 4096, 16), Split::Whole, "just under 4 MiB");
        assert_eq!(Split::of(256, 8, 4096, 16), Split::Whole, "4 MiB: one part's worth");
        assert_eq!(Split::of(512, 8, 4096, 16), Split::Tokens { chunk: 74, threads: 2 });
        // Fewer tokens than rows: each part reads all the tokens, and its share of the rows.
        assert_eq!(Split::of(8, 1024, 4096, 16), Split::Rows { chunk: 79, threads: 4 });
    }

    #[test]
    fn a_product_is_split_only_into_parts_that_sum_in_its_order() {
        assert_eq!(product_threads(4096, 256, 7168, 8), 8);
        assert_eq!(product_threads(1024, 8, 512, 8), 1, "a small router is not worth a thread");
        assert_eq!(product_threads(1, 256, 7168 * 1024, 8), 1, "one token is a matrix-vector product: not split");
        assert_eq!(product_threads(1 << 20, 1, 1024, 8), 1, "nor is one row");
        // 100 tokens over 2 threads would be two 50 x 60 products, summed with another block depth.
        assert_eq!(product_threads(100, 60, 22_400, 8), 1);
        // 130 over 2 are 65 each, still blocked; over 3, 44 each would not be.
        assert_eq!(product_threads(130, 60, 30_000, 8), 2);
        assert_eq!(product_threads(60, 130, 30_000, 3), 2);
        assert_eq!(product_threads(1000, 2, 1 << 20, 8), 8, "parts of 125 tokens stay blocked against 2 rows");
        // 129 over 2 are 65 and 64: the last part counts too.
        assert_eq!(product_threads(129, 60, 40_000, 8), 1);
        // 194 over 3 are 65, 65 and 64; over 2, 97 each.
        assert_eq!(product_threads(194, 60, 20_000, 3), 2);
    }

    #[test]
    fn a_split_product_sums_the_same_as_one_thread() {
        // Tokens split (more tokens than rows), rows split (fewer), chunks just over 64 tokens, and
        // chunks of 38 tokens against 300 rows.
        for (tokens, rows, d_model) in [(1001, 67, 3001), (67, 1001, 3001), (130, 60, 30_000), (300, 300, 1500)] {
            let hidden: Vec<f32> = (0..tokens * d_model).map(spread).collect();
            let weights: Vec<f32> = (0..rows * d_model).map(|i| spread(i + 13)).collect();
            assert_eq!(product_threads(tokens, rows, d_model, 8), 2, "{tokens} x {rows} x {d_model}");
            let projection = Projection::new(&weights, rows, d_model);
            let alone = project(&projection, &hidden, 1);
            let split = project(&projection, &hidden, 8);
            assert_eq!(bits(&split), bits(&alone), "{tokens} x {rows} x {d_model}");
            let (t, r) = (tokens - 1, rows - 1);
            let want = naive_products(&hidden[t * d_model..], &weights[r * d_model..], d_model)[0];
            assert!(
                (split[t * rows + r] - want).abs() <= 1e-4 * want.abs().max(1.0),
                "the last value is the last dot product"
            );
        }
    }
}
