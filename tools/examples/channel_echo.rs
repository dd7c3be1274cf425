//! What the data path's own HTTP/2 channel saves on a small call: the bench's echo server answered
//! by tonic's generated client over tonic's channel and, in turns, by `zero_copy::unary` over
//! `H2Channel` (how Forward requests go), with the project's transport settings.
//!
//! `cargo run --release -p switchyard-tools --example channel_echo -- [BYTES] [REPEATS] [ROUNDS]`
//! (default 4096 bytes, 2000 repeats, 3 rounds); the client runs on a 2-worker runtime as the
//! bench's does.

use std::time::Duration;

use switchyard_tools::bench::wire::{EchoServer, echo_calls, uncopied_echo_calls};

/// Unmeasured calls before the timed ones: connection set-up and the first windows.
const WARMUP_CALLS: u32 = 100;

fn describe(mut times: Vec<Duration>) -> String {
    times.sort();
    let micros = |time: &Duration| time.as_secs_f64() * 1e6;
    let mean = times.iter().map(micros).sum::<f64>() / times.len() as f64;
    let quantile = |q: f64| micros(&times[((times.len() - 1) as f64 * q) as usize]);
    format!("p50 {:.1} µs, p90 {:.1}, mean {mean:.1}", quantile(0.5), quantile(0.9))
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
                describe(tonic),
                describe(own)
            );
        }
        Ok::<_, std::io::Error>(())
    })?;
    server.stop()
}
