//! What comes before a transfer changes what the wire gives: raw TCP on loopback, over one
//! connection and to RECEIVERS threads at once (BYTES to each over a connection of its own), each
//! round right after the previous one (as the bench measures its baselines), after every core was
//! kept busy BUSY_MS (as a layer call's gate keeps the client's cores before its dispatch), and
//! after BUSY_MS with nothing to do.
//!
//! `cargo run --release -p switchyard-tools --example busy_before_transfer -- [BYTES] [RECEIVERS] [REPEATS] [BUSY_MS]`
//! (default 1826048 bytes, DeepEP low-latency's request to one of 2 workers; 2 receivers; 40
//! repeats; 6 ms, about that preset's gate on 2 cores).

use std::time::Duration;

use switchyard_tools::bench::spread::Spread;
use switchyard_tools::bench::wire::{Before, ReceiveBuffer, WireFigure, tcp_to_every_receiver};

/// Buffers 64 bytes into a page, where the kernel's copy is fast on the machine this was written
/// on (`examples/receive_alignment.rs`), so that the order of rounds is all that changes.
const RECEIVE_BUFFER: ReceiveBuffer = ReceiveBuffer::AtPageOffset(64);

fn main() -> std::io::Result<()> {
    let mut arguments = std::env::args().skip(1);
    let bytes: usize = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(1_826_048);
    let receivers: usize = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(2).max(1);
    let repeats: u32 = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(40).max(1);
    let busy = Duration::from_millis(arguments.next().and_then(|value| value.parse().ok()).unwrap_or(6));
    println!("{bytes} bytes to each receiver, {repeats} repeats per row");
    let orders = [
        ("right after the previous round", Before::PreviousRound),
        ("after every core was busy", Before::BusyCores(busy)),
        ("after the cores were idle", Before::Idle(busy)),
    ];
    for turn in 0..2 {
        for (order, before) in orders {
            for receivers in [1, receivers] {
                let times = tcp_to_every_receiver(receivers, bytes, repeats, RECEIVE_BUFFER, before)?;
                let figure = WireFigure::to_every_receiver(bytes as u64, receivers as u64, &times);
                println!(
                    "turn {turn}, {receivers} receiver(s), {order:<31}: mean {:>6.0} µs, p50 {:>6.0} µs, {:.2} GB/s",
                    figure.mean_us,
                    Spread::of(&times).p50_us,
                    figure.gb_per_s,
                );
            }
        }
    }
    Ok(())
}
