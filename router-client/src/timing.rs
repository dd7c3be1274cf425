//! Where the time and the bytes of one layer call went.
//!
//! The phases follow the critical path, so they add up to the call's wall time: the client's own
//! steps run one after another, and of the concurrent worker calls only the slowest one (the
//! straggler) delays the answer. Its time splits into network (its RPC time less the worker's own
//! handler time: transfer, framing, encode/decode in tonic), queue wait and expert compute.
//! Answers are decoded and summed as they arrive, mostly while later ones are still on the wire;
//! decode and combine count only what is left after the last answer (each worker's
//! [`WorkerCall`](crate::ledger::WorkerCall) keeps its full decode and combine time).

use std::ops::AddAssign;
use std::time::Duration;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TimeBreakdown {
    /// Gate logits and the routing policy.
    pub gate: Duration,
    /// Capacity, grouping by expert and by worker, and the hand-off to and from the CPU pool.
    pub plan: Duration,
    /// Gathering rows into wire payloads.
    pub encode: Duration,
    /// Straggler RPC time not spent inside the worker.
    pub network: Duration,
    /// Straggler worker time not spent computing (queue wait, batching).
    pub queue_wait: Duration,
    /// Straggler worker expert compute.
    pub compute: Duration,
    /// Turning answer payloads into f32 rows, after the last answer arrived.
    pub decode: Duration,
    /// Weighted sum into the output, after the last answer arrived.
    pub combine: Duration,
    /// The whole call, measured by the caller's clock.
    pub wall: Duration,
}

impl TimeBreakdown {
    pub const PHASES: [&'static str; 8] =
        ["gate", "plan", "encode", "network", "queue_wait", "compute", "decode", "combine"];

    pub fn phases(&self) -> [Duration; 8] {
        [self.gate, self.plan, self.encode, self.network, self.queue_wait, self.compute, self.decode, self.combine]
    }

    /// Every phase divided by `count` (the mean of `count` summed calls).
    pub fn mean_of(self, count: u64) -> Self {
        let count = count.clamp(1, u64::from(u32::MAX)) as u32;
        let [gate, plan, encode, network, queue_wait, compute, decode, combine] =
            self.phases().map(|phase| phase / count);
        Self { gate, plan, encode, network, queue_wait, compute, decode, combine, wall: self.wall / count }
    }
}

impl AddAssign for TimeBreakdown {
    fn add_assign(&mut self, other: Self) {
        self.gate += other.gate;
        self.plan += other.plan;
        self.encode += other.encode;
        self.network += other.network;
        self.queue_wait += other.queue_wait;
        self.compute += other.compute;
        self.decode += other.decode;
        self.combine += other.combine;
        self.wall += other.wall;
    }
}

/// gRPC's length-prefix of every message: a compression flag and a 4-byte length.
pub const GRPC_FRAME_PREFIX: u64 = 5;

/// Bytes of one call. `payload` counts tensor bytes; `message` counts the encoded protobuf messages
/// plus gRPC's 5-byte frame header (HTTP/2 framing adds 9 bytes per 1 MiB frame beyond that).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteCounts {
    pub payload_sent: u64,
    pub payload_received: u64,
    pub message_sent: u64,
    pub message_received: u64,
}

impl AddAssign for ByteCounts {
    fn add_assign(&mut self, other: Self) {
        self.payload_sent += other.payload_sent;
        self.payload_received += other.payload_received;
        self.message_sent += other.message_sent;
        self.message_received += other.message_received;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakdown(micros: u64) -> TimeBreakdown {
        let phase = |n: u64| Duration::from_micros(micros * n);
        TimeBreakdown {
            gate: phase(1),
            plan: phase(2),
            encode: phase(3),
            network: phase(4),
            queue_wait: phase(5),
            compute: phase(6),
            decode: phase(7),
            combine: phase(8),
            wall: phase(40),
        }
    }

    #[test]
    fn summed_calls_average_to_their_mean_phase_by_phase() {
        let mut total = breakdown(10);
        total += breakdown(20);
        assert_eq!(total, breakdown(30));
        assert_eq!(total.mean_of(3), breakdown(10));
        assert_eq!(total.mean_of(0), total, "no calls counts as one");
        let phases: Vec<u64> = total.phases().iter().map(|phase| phase.as_micros() as u64).collect();
        assert_eq!(phases, [30, 60, 90, 120, 150, 180, 210, 240], "in the order of PHASES");
    }
}
