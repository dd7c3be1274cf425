//! The bench's progress: one line per measured point, preset and step, handed to the caller.

use super::results::{PointResult, PresetResult, StepResult};

/// Called after each point with (points done, points in all, the point's one-line summary).
pub type Progress<'a> = &'a (dyn Fn(usize, usize, &str) + Sync);

/// Counts measured points and reports each to the caller's [`Progress`].
pub(super) struct Tally<'a> {
    done: usize,
    total: usize,
    progress: Progress<'a>,
}

impl<'a> Tally<'a> {
    pub(super) fn new(total: usize, progress: Progress<'a>) -> Self {
        Self { done: 0, total, progress }
    }

    pub(super) fn finished(&mut self, line: &str) {
        self.done += 1;
        (self.progress)(self.done, self.total, line);
    }
}

pub(super) fn step_line(step: &StepResult) -> String {
    let summary = step.summary();
    format!(
        "step of {} layers, {} tokens{}: {:.2} ms distributed ({:.0}% communication), {:.2} ms in-process",
        summary.layers,
        summary.tokens,
        summary.link_rate.as_ref().map_or_else(String::new, |rate| format!(" on {rate} links")),
        summary.distributed.step_ms,
        100.0 * summary.distributed.communication_ms / summary.distributed.step_ms.max(1e-12),
        summary.reference.step_ms,
    )
}

pub(super) fn point_line(result: &PointResult) -> String {
    let cpu = result.cpu_per_call.map_or_else(String::new, |cpu| {
        format!(" (CPU a call: {:.2} ms and {:.2} ms)", cpu.distributed_us / 1e3, cpu.in_process_us / 1e3)
    });
    format!(
        "{}, {} tokens, {}: {:.2} ms distributed, {} in-process{cpu}",
        result.point.shape,
        result.point.tokens,
        result.point.wire_dtype.name(),
        result.distributed_ms(),
        result.reference_ms().map_or("-".into(), |ms| format!("{ms:.2} ms")),
    )
}

pub(super) fn preset_line(preset: &PresetResult) -> String {
    let summary = preset.summary();
    let beside = |share_of_one: f64, share_of_every: Option<f64>| match share_of_every {
        Some(every) => format!(
            ": {:.0}% of TCP on one connection, {:.0}% of TCP to every worker at once",
            share_of_one * 100.0,
            every * 100.0
        ),
        None => String::new(),
    };
    let after_gate =
        match (summary.tcp_to_every_worker_after_gate, summary.dispatch_share_of_tcp_to_every_worker_after_gate) {
            (Some(after), Some(share)) => format!(
                ", {:.0}% of it right after every core was busy as long as the gate ({:.1} ms)",
                share * 100.0,
                after.busy_us / 1e3
            ),
            _ => String::new(),
        };
    let link = match (summary.link_rate, summary.floor_ratios()) {
        (Some(rate), Some((dispatch, combine))) => {
            format!(" on {rate} links: whole transfers {dispatch:.2}x and {combine:.2}x the link's floor")
        }
        _ => String::new(),
    };
    format!(
        "{}: dispatch {:.0} µs ({:.2} GB/s{}), combine {:.0} µs ({:.2} GB/s{}){link}",
        preset.name,
        summary.dispatch_transfer_us,
        summary.dispatch_gb_per_s,
        beside(summary.dispatch_share_of_tcp, summary.dispatch_share_of_tcp_to_every_worker) + &after_gate,
        summary.combine_transfer_us,
        summary.combine_gb_per_s,
        beside(summary.combine_share_of_tcp, summary.combine_share_of_tcp_to_every_worker),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::bench::process_cpu::CpuPerCall;
    use crate::bench::results::PresetResult;
    use crate::bench::results::tests::{point, preset_beside_baselines};

    #[test]
    fn each_measured_thing_is_counted_and_reported_in_turn() {
        let lines = Mutex::new(Vec::new());
        let report =
            |done: usize, total: usize, line: &str| lines.lock().unwrap().push(format!("{done}/{total} {line}"));
        let mut tally = Tally::new(3, &report);
        tally.finished("first");
        tally.finished("second");
        assert_eq!(lines.into_inner().unwrap(), ["1/3 first", "2/3 second"]);
    }

    /// A point's line gives both targets' means; a preset's its rates against every baseline the
    /// run measured and its link's floors, and no more than it measured.
    #[test]
    fn a_line_says_what_was_measured_against_what() {
        assert_eq!(
            point_line(&point()),
            "2 workers, 8 experts, top-2, 4x8, 10 tokens, f32: 2.00 ms distributed, 0.50 ms in-process"
        );
        let cpu = CpuPerCall { distributed_us: 2480.0, in_process_us: 612.0 };
        assert_eq!(
            point_line(&PointResult { cpu_per_call: Some(cpu), ..point() }),
            "2 workers, 8 experts, top-2, 4x8, 10 tokens, f32: 2.00 ms distributed, 0.50 ms in-process \
             (CPU a call: 2.48 ms and 0.61 ms)"
        );
        let preset = preset_beside_baselines();
        assert_eq!(
            preset_line(&preset),
            "test: dispatch 500 µs (0.00 GB/s: 50% of TCP on one connection, 25% of TCP to every worker at once, \
             200% of it right after every core was busy as long as the gate (0.1 ms)), combine 250 µs (0.00 GB/s: 50% \
             of TCP on one connection, 25% of TCP to every worker at once) on 8mbit links: whole transfers 0.80x and \
             0.86x the link's floor"
        );
        let loopback_alone =
            PresetResult { link: None, tcp_to_every_worker: None, tcp_to_every_worker_after_gate: None, ..preset };
        assert_eq!(preset_line(&loopback_alone), "test: dispatch 500 µs (0.00 GB/s), combine 250 µs (0.00 GB/s)");
    }
}
