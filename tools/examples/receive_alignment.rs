//! How much a receive buffer's place in its page changes the kernel's copy into it: raw TCP on
//! loopback to RECEIVERS threads at once, BYTES to each over a connection of its own, each
//! receiver reading into a buffer that starts OFFSET bytes into a page, for a few offsets in turn.
//!
//! On this project's 2-core development VM (AMD EPYC), 1.83 MB to 2 receivers took 1.5-1.9 ms
//! into buffers 16 bytes into a page and 0.4-0.7 ms into buffers on a page boundary or 64 bytes
//! in: 16 bytes is where glibc puts a block it maps on its own (anything above its mmap
//! threshold, 128 KiB by default), so a process on glibc's defaults receives large messages at
//! the slow offset. `freed_buffers` keeps such blocks on the heap, at whatever offset the heap
//! gives, so the offset is one source of the swings between runs of the loopback figures.
//!
//! `cargo run --release -p switchyard-tools --example receive_alignment -- [BYTES] [RECEIVERS] [REPEATS]`
//! (default 1826048 bytes, DeepEP low-latency's request to one of 2 workers; 2 receivers; 40 repeats).

use switchyard_tools::bench::spread::Spread;
use switchyard_tools::bench::wire::{Before, ReceiveBuffer, WireFigure, tcp_to_every_receiver};

/// Offsets into a page tried, each twice, in turn.
const OFFSETS: [usize; 5] = [0, 16, 64, 1024, 2048];

fn main() -> std::io::Result<()> {
    let mut arguments = std::env::args().skip(1);
    let bytes: usize = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(1_826_048);
    let receivers: usize = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(2).max(1);
    let repeats: u32 = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(40).max(1);
    println!("{bytes} bytes to each of {receivers} receivers at once, {repeats} repeats per row");
    for turn in 0..2 {
        for offset in OFFSETS {
            let times = tcp_to_every_receiver(
                receivers,
                bytes,
                repeats,
                ReceiveBuffer::AtPageOffset(offset),
                Before::PreviousRound,
            )?;
            let figure = WireFigure::to_every_receiver(bytes as u64, receivers as u64, &times);
            println!(
                "turn {turn}, receive buffer {offset:>4} bytes into a page: mean {:>6.0} µs, p50 {:>6.0} µs, {:.2} GB/s",
                figure.mean_us,
                Spread::of(&times).p50_us,
                figure.gb_per_s,
            );
        }
    }
    Ok(())
}
