//! Load reports as the terminal shows them.

use std::fmt::Write as _;

use switchyard_router_client::ledger::LedgerRow;

use super::LedgerCells;
use crate::loadtest::LoadSummary;

/// The human-readable summary of one load test.
pub fn load_report(summary: &LoadSummary) -> String {
    let ms = |value: f64| format!("{value:.3} ms");
    let mut text = String::new();
    let load = match (summary.rate_calls_per_s, summary.arrival.strip_prefix("ramp ")) {
        (None, _) => format!("closed loop, concurrency {}", summary.concurrency),
        (Some(rate), Some(stages)) => {
            format!("open loop ramping through {stages} calls/s ({rate:.1} calls/s on average)")
        }
        (Some(rate), None) => format!("open loop, {rate} calls/s Poisson"),
    };
    let _ = write!(
        text,
        "{}: {} tokens/call, {load}, measured {:.1} s",
        summary.target, summary.tokens_per_call, summary.measured_s
    );
    if summary.elapsed_s > summary.measured_s * 1.01 {
        let _ = write!(text, " (its calls ended {:.1} s after it began; rates are over that)", summary.elapsed_s);
    }
    text.push('\n');
    let _ = write!(text, "  calls       {} ok, {} failed", summary.calls, summary.failed);
    if summary.dropped_arrivals > 0 {
        let _ = write!(text, ", {} arrivals dropped (--max-in-flight calls were out)", summary.dropped_arrivals);
    }
    text.push('\n');
    for (code, count) in &summary.errors {
        let _ = writeln!(text, "    {code}: {count}");
    }
    if let Some(error) = &summary.first_error {
        let _ = writeln!(text, "    first error: {error}");
    }
    let _ = writeln!(text, "  throughput  {:.0} tokens/s ({:.1} calls/s)", summary.tokens_per_s, summary.calls_per_s);
    let _ = writeln!(
        text,
        "  latency     p50 {}  p90 {}  p95 {}  p99 {}  max {}  (min {}, mean {}, stddev {})",
        ms(summary.latency_p50_ms),
        ms(summary.latency_p90_ms),
        ms(summary.latency_p95_ms),
        ms(summary.latency_p99_ms),
        ms(summary.latency_max_ms),
        ms(summary.latency_min_ms),
        ms(summary.latency_mean_ms),
        ms(summary.latency_stddev_ms)
    );
    let _ = writeln!(
        text,
        "  overflow    {} of {} assignments dropped ({:.2}%), {} re-routed, {} refused by full queues",
        summary.dropped,
        summary.assignments,
        100.0 * summary.dropped_fraction,
        summary.rerouted,
        summary.refused
    );
    let _ = writeln!(
        text,
        "  router      imbalance {:.3} (max/mean load) | switch aux loss {:.5} | importance CV² {:.4} | z-loss {:.4}",
        summary.imbalance, summary.switch_aux_loss, summary.importance_cv2, summary.z_loss
    );
    if summary.message_bytes_sent_per_call > 0 {
        let _ = writeln!(
            text,
            "  bytes/call  sent {} B ({} B payload), received {} B ({} B payload)",
            summary.message_bytes_sent_per_call,
            summary.payload_bytes_sent_per_call,
            summary.message_bytes_received_per_call,
            summary.payload_bytes_received_per_call
        );
    }
    let phases = summary.phases.rows();
    let means: Vec<String> = phases.iter().map(|(name, mean, _)| format!("{name} {}", ms(*mean))).collect();
    let _ = writeln!(text, "  time/call   {} | wall {}", means.join(" | "), ms(summary.wall_mean_ms));
    let p99s: Vec<String> = phases.iter().map(|(name, _, p99)| format!("{name} {}", ms(*p99))).collect();
    let _ = writeln!(text, "  p99/phase   {}", p99s.join(" | "));
    if let Some(step) = &summary.step {
        let share = |part: f64| 100.0 * part / step.step_ms.max(1e-12);
        let _ = writeln!(
            text,
            "  step        {} MoE layers, mean {}: communication {} ({:.0}%) | expert compute {} ({:.0}%) | client compute {} ({:.0}%, attention stand-in {})",
            step.layers,
            ms(step.step_ms),
            ms(step.communication_ms),
            share(step.communication_ms),
            ms(step.expert_compute_ms),
            share(step.expert_compute_ms),
            ms(step.client_compute_ms),
            share(step.client_compute_ms),
            ms(step.attention_ms),
        );
    }
    if !summary.expert_load.is_empty() {
        let loads: Vec<String> = summary.expert_load.iter().map(u64::to_string).collect();
        let _ = writeln!(text, "  per expert  {} assignments", loads.join(" "));
    }
    if !summary.ledger.is_empty() {
        text.push_str("  ledger      per (layer → worker), means per call:\n");
        text.push_str(&ledger(&summary.ledger));
    }
    text
}

/// A ledger as two indented lines per (layer → worker) pair.
fn ledger(rows: &[LedgerRow]) -> String {
    let mut text = String::new();
    for cells in rows.iter().map(LedgerCells::of) {
        let direction = |received: bool| {
            let parts: Vec<String> = cells
                .bytes
                .iter()
                .map(|(kind, sent, got)| format!("{} B {kind}", if received { got } else { sent }))
                .collect();
            parts.join(", ")
        };
        let _ = writeln!(
            text,
            "  {}: {} rows | sent {} | received {}",
            cells.pair,
            cells.rows,
            direction(false),
            direction(true)
        );
        let micros: Vec<String> = cells.micros.iter().map(|(step, value)| format!("{step} {value}")).collect();
        let _ = writeln!(text, "      µs/call: {} | straggler in {}", micros.join(" | "), cells.straggler);
    }
    text
}
