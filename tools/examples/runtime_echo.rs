//! What the Tokio runtime's thread hand-offs add to a small gRPC call: the bench's 4 KiB echo
//! with the client and the server each on a current-thread runtime or a multi-thread one of N
//! workers, with the project's transport settings.
//!
//! h2 holds a client stream's DATA until the connection task has written its HEADERS, so every
//! request passes connection task → body task → connection task before its bytes leave; on a
//! multi-thread runtime those hand-offs can land on another worker thread and each costs a wake.
//! (The data path's own channel, `H2Channel`, avoids them: `examples/channel_echo.rs`.)
//!
//! `cargo run --release -p switchyard-tools --example runtime_echo -- CLIENT SERVER [BYTES] [REPEATS]`
//! where CLIENT and SERVER are `current` or a worker count (default 4096 bytes, 3000 repeats).

use switchyard_tools::bench::spread::Spread;
use switchyard_tools::bench::wire::{EchoServer, echo_calls};

/// Unmeasured calls before the timed ones: connection set-up and the first windows.
const WARMUP_CALLS: u32 = 100;

fn runtime(kind: &str) -> std::io::Result<tokio::runtime::Runtime> {
    match kind {
        "current" => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        workers => {
            let workers = workers.parse().map_err(|_| {
                std::io::Error::other(format!("{workers:?}: expected `current` or a number of worker threads"))
            })?;
            tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
        }
    }
}

fn main() -> std::io::Result<()> {
    let mut arguments = std::env::args().skip(1);
    let client_kind = arguments.next().unwrap_or_else(|| "current".to_owned());
    let server_kind = arguments.next().unwrap_or_else(|| "2".to_owned());
    let bytes = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(4096);
    let repeats: u32 = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(3000);

    let server = EchoServer::start_on(runtime(&server_kind)?)?;
    let times = runtime(&client_kind)?.block_on(async {
        // A channel starts its background task on the runtime it is made in.
        let channel = server.channel()?;
        // Connection set-up and the first windows stay out of the timed calls.
        echo_calls(channel.clone(), bytes, WARMUP_CALLS, false).await?;
        echo_calls(channel, bytes, repeats, false).await
    })?;
    server.stop()?;
    let spread = Spread::of(&times);
    println!(
        "{bytes} B echo, client {client_kind}, server {server_kind}: mean {:.1} µs, p50 {:.1}, p90 {:.1} ({repeats} calls)",
        spread.mean_us, spread.p50_us, spread.p90_us
    );
    Ok(())
}
