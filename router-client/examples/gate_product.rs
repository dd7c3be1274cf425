//! How long the gate's product takes, `[tokens, d_model] · [d_model, rows]`, with one thread and
//! with as many as `Projection` chooses when more may join: the median of 30 products, each on
//! hidden states the previous ones did not leave in the caches (a call's hidden states come from
//! the model's previous layer, not from this product).
//!
//! ```text
//! cargo run --release -p switchyard-router-client --example gate_product [THREADS]
//! ```

use std::time::{Duration, Instant};

use switchyard_router_client::projection::{Projection, product_threads};

const ROUNDS: usize = 30;
/// Hidden states in turn, together larger than a server's last-level cache.
const HIDDEN_BYTES_IN_TURN: usize = 256 << 20;

/// (name, tokens, d_model, router rows)
const SHAPES: [(&str, usize, usize, usize); 5] = [
    ("Mixtral router, 256 tokens", 256, 4096, 8),
    ("Mixtral router, 1024 tokens", 1024, 4096, 8),
    ("Mixtral router, 4096 tokens", 4096, 4096, 8),
    ("DeepEP low-latency router", 128, 7168, 256),
    ("DeepEP normal router", 4096, 7168, 256),
];

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let most = std::env::args()
        .nth(1)
        .and_then(|threads| threads.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    println!("median of {ROUNDS} products; up to {most} threads");
    for (name, tokens, d_model, rows) in SHAPES {
        let weights: Vec<f32> =
            (0..rows * d_model).map(|index| ((index * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
        let projection = Projection::new(&weights, rows, d_model);
        let hidden_bytes = tokens * d_model * 4;
        let copies = (HIDDEN_BYTES_IN_TURN / hidden_bytes).clamp(1, 16);
        let hidden: Vec<Vec<f32>> = (0..copies)
            .map(|copy| (0..tokens * d_model).map(|index| ((index + copy) % 1999) as f32 / 999.0 - 1.0).collect())
            .collect();
        let mut out = Vec::new();
        let mut time = |threads: usize| {
            median(
                (0..ROUNDS)
                    .map(|round| {
                        let started = Instant::now();
                        projection.project_into(&hidden[round % copies], &mut out, threads);
                        started.elapsed()
                    })
                    .collect(),
            )
        };
        let alone = time(1);
        let split = time(most);
        let parts = product_threads(tokens, rows, d_model, most);
        let gflops = |took: Duration| (2 * tokens * rows * d_model) as f64 / took.as_secs_f64() / 1e9;
        println!(
            "{name} ({tokens} x {d_model} x {rows}, {:.1} MB of hidden states): 1 thread {alone:.2?} ({:.0} GFLOP/s), \
             {parts} thread(s) {split:.2?} ({:.0} GFLOP/s)",
            hidden_bytes as f64 / 1e6,
            gflops(alone),
            gflops(split),
        );
    }
}
