//! What the data path's own HTTP/2 channel saves on a small call: the bench's echo server answered
//! by tonic's generated client over tonic's channel and, in turns, by `zero_copy::unary` over
//! `H2Channel` (how Forward requests go), with the project's transport settings.
//!
//! `cargo run --release -p switchyard-tools --example channel_echo -- [BYTES] [REPEATS] [ROUNDS]`
//! (default 4096 bytes, 2000 repeats, 3 rounds); the client runs on a 2-worker runtime as the
//! bench's does.

use std::time::Duration;

use switchyard_tools::bench::spread::Spread;
use switchyard_tools::bench::wire::{EchoServer, echo_calls, uncopied_echo_calls};

/// Unmeasured calls before the timed ones: connection set-up and the first windows.
const WARMUP_CALLS: u32 = 100;

fn describe(times: &[Duration]) -> String {
    let spread = Spread::of(times);
    format!("p50 {:.1} µs, p90 {:.1}, mean {:.1}", spread.p50_us, spread.p90_us, spread.mean_us)
}

fn main() -> std::io::Result<()> {
    let mut arguments = std::env::args().skip(1).map(|value| value.parse::<usize>().ok());
    let bytes = arguments.next().flatten().unwrap_or(4096);
    let repeats = arguments.next().flatten().unwrap_or(2000) as u32;
    let rounds = arguments.next().flatten().unwrap_or(3);

    let server = EchoServer::start()?;
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(async {
        // Both channels are made on this runtime: a channel's connection task runs where it is made.
        let tonic_channel = server.channel()?;
        let mut h2_channel = server.h2_channel()?;
        echo_calls(tonic_channel.clone(), bytes, WARMUP_CALLS, false).await?;
        uncopied_echo_calls(&mut h2_channel, bytes, WARMUP_CALLS, false).await?;
        for round in 1..=rounds {
            let tonic = echo_calls(tonic_channel.clone(), bytes, repeats, false).await?;
            let own = uncopied_echo_calls(&mut h2_channel, bytes, repeats, false).await?;
            println!(
                "round {round}, {bytes} B echo: tonic's channel {} | H2Channel {}",
                describe(&tonic),
                describe(&own)
            );
        }
        Ok::<_, std::io::Error>(())
    })?;
    server.stop()
}
