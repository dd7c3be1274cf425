//! How fast rows cross the wire format: encode and decode of DeepEP's low-latency dispatch (128
//! tokens x 7168 values) in each wire dtype, best of 50 rounds, on one thread.
//!
//!   cargo run --release -p switchyard-proto --example wire_codec

use std::time::{Duration, Instant};

use bytes::BytesMut;
use switchyard_proto::wire::{WireDtype, decode_rows_into, encode_row_into};

const TOKENS: usize = 128;
const WIDTH: usize = 7168;
const ROUNDS: usize = 50;

fn best(mut round: impl FnMut()) -> Duration {
    (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            round();
            started.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let values: Vec<f32> = (0..TOKENS * WIDTH).map(|index| ((index * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
    let gigabytes = (values.len() * 4) as f64 / 1e9;
    println!("{TOKENS} x {WIDTH} values, best of {ROUNDS}; GB/s of f32 values");
    for dtype in [WireDtype::F32, WireDtype::F16, WireDtype::Bf16, WireDtype::Fp8E4m3] {
        let mut encoded = BytesMut::with_capacity(TOKENS * dtype.row_bytes(WIDTH));
        let encode = best(|| {
            encoded.clear();
            for row in values.chunks_exact(WIDTH) {
                encode_row_into(row, dtype, &mut encoded);
            }
        });
        let mut decoded = vec![0.0f32; values.len()];
        let decode = best(|| decode_rows_into(&encoded, WIDTH, dtype, &mut decoded));
        // A field inside a received frame may start at an odd address.
        let shifted = [&[0u8][..], &encoded].concat();
        let decode_odd = best(|| decode_rows_into(&shifted[1..], WIDTH, dtype, &mut decoded));
        let rate = |time: Duration| (time.as_secs_f64() * 1e6, gigabytes / time.as_secs_f64());
        let ((encode_us, encode_rate), (decode_us, decode_rate), (odd_us, odd_rate)) =
            (rate(encode), rate(decode), rate(decode_odd));
        println!(
            "{:>8}: encode {encode_us:>7.1} µs ({encode_rate:>5.1} GB/s), decode {decode_us:>7.1} µs \
             ({decode_rate:>5.1} GB/s), at an odd address {odd_us:>7.1} µs ({odd_rate:>5.1} GB/s)",
            format!("{dtype:?}"),
        );
    }
}
