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

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use switchyard_tools::bench::spread::Spread;

const PAGE: usize = 4096;

/// Offsets into a page tried, each twice, in turn.
const OFFSETS: [usize; 5] = [0, 16, 64, 1024, 2048];

/// `len` bytes of `storage` starting `offset` bytes into a page.
fn at_offset(storage: &mut [u8], offset: usize, len: usize) -> &mut [u8] {
    let start = (storage.as_ptr() as usize).next_multiple_of(PAGE) - storage.as_ptr() as usize + offset;
    &mut storage[start..start + len]
}

/// The times of `repeats` transfers (after one unmeasured) of `bytes` to each of `receivers`.
fn transfers(bytes: usize, receivers: usize, repeats: u32, offset: usize) -> std::io::Result<Vec<Duration>> {
    let start = Arc::new(Barrier::new(receivers + 1));
    let done = Arc::new(Barrier::new(receivers + 1));
    let mut threads = Vec::new();
    for _ in 0..receivers {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let mut sender = TcpStream::connect(listener.local_addr()?)?;
        let (mut receiver, _) = listener.accept()?;
        sender.set_nodelay(true)?;
        threads.push(std::thread::spawn(move || -> std::io::Result<()> {
            let mut storage = vec![1u8; bytes + 2 * PAGE];
            let buffer = at_offset(&mut storage, offset, bytes);
            for _ in 0..=repeats {
                receiver.read_exact(buffer)?;
                receiver.write_all(&[1])?;
            }
            Ok(())
        }));
        let (start, done) = (start.clone(), done.clone());
        threads.push(std::thread::spawn(move || -> std::io::Result<()> {
            let payload = vec![0x5au8; bytes];
            let mut acknowledgement = [0u8; 1];
            for _ in 0..=repeats {
                start.wait();
                let sent = sender.write_all(&payload).and_then(|()| sender.read_exact(&mut acknowledgement));
                done.wait();
                sent?;
            }
            Ok(())
        }));
    }
    let mut times = Vec::with_capacity(repeats as usize);
    for round in 0..=repeats {
        let started = Instant::now();
        start.wait();
        done.wait();
        if round > 0 {
            times.push(started.elapsed());
        }
    }
    for thread in threads {
        thread.join().map_err(|_| std::io::Error::other("a transfer thread panicked"))??;
    }
    Ok(times)
}

fn main() -> std::io::Result<()> {
    let mut arguments = std::env::args().skip(1);
    let bytes: usize = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(1_826_048);
    let receivers: usize = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(2).max(1);
    let repeats: u32 = arguments.next().and_then(|value| value.parse().ok()).unwrap_or(40).max(1);
    println!("{bytes} bytes to each of {receivers} receivers at once, {repeats} repeats per row");
    for turn in 0..2 {
        for offset in OFFSETS {
            let times = transfers(bytes, receivers, repeats, offset)?;
            let spread = Spread::of(&times);
            let gb_per_s = (bytes * receivers) as f64 / (spread.mean_us * 1e-6).max(1e-12) / 1e9;
            println!(
                "turn {turn}, receive buffer {offset:>4} bytes into a page: mean {:>6.0} µs, p50 {:>6.0} µs, {gb_per_s:.2} GB/s",
                spread.mean_us, spread.p50_us,
            );
        }
    }
    Ok(())
}
