//! The wire baselines at one message size: raw TCP and a plain gRPC echo on this machine's
//! loopback, with the project's transport settings. What a call of that size costs before any
//! Switchyard code runs.
//!
//! `cargo run --release -p switchyard-tools --example wire_echo -- [BYTES] [REPEATS]`
//! (default 4096 bytes, a 1-token call of the 512x1024 model in f32 rows of top-2, and 2000).

use switchyard_tools::bench::wire;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut arguments = std::env::args().skip(1);
    let bytes = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(4096);
    let repeats = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(2000);
    let baselines = wire::measure(bytes, repeats).await?;
    println!("{bytes} bytes, mean of {repeats}:");
    let rows = [
        ("TCP one way", baselines.tcp_one_way),
        ("TCP echo", baselines.tcp_echo),
        ("gRPC one way", baselines.grpc_one_way),
        ("gRPC echo", baselines.grpc_echo),
    ];
    for (name, figure) in rows {
        println!("  {name:<13} {:>9.1} µs  {:>6.2} GB/s", figure.mean_us, figure.gb_per_s);
    }
    if let Some(figure) = baselines.grpc_one_way_uncopied {
        println!("  {:<13} {:>9.1} µs  {:>6.2} GB/s", "gRPC uncopied", figure.mean_us, figure.gb_per_s);
    }
    Ok(())
}
