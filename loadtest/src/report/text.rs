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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use switchyard_router_client::ledger::PairMeans;

    use super::*;
    use crate::loadtest::{PhaseFigures, RunInfo, StepSplit};

    /// A closed-loop run of 200 calls in 10 s, each figure a value of its own.
    fn closed_loop() -> LoadSummary {
        LoadSummary {
            target: "cluster http://127.0.0.1:5000".into(),
            arrival: "closed".into(),
            concurrency: 4,
            rate_calls_per_s: None,
            tokens_per_call: 64,
            measured_s: 10.0,
            elapsed_s: 10.0,
            calls: 200,
            failed: 0,
            tokens_per_s: 1280.0,
            calls_per_s: 20.0,
            latency_p50_ms: 1.5,
            latency_p90_ms: 2.25,
            latency_p99_ms: 3.125,
            latency_p999_ms: 4.0,
            latency_max_ms: 5.5,
            latency_p95_ms: 2.5,
            latency_min_ms: 0.75,
            latency_mean_ms: 1.625,
            latency_stddev_ms: 0.5,
            dropped_arrivals: 0,
            assignments: 25_600,
            dropped: 128,
            dropped_fraction: 0.005,
            rerouted: 3,
            refused: 2,
            imbalance: 1.25,
            switch_aux_loss: 0.0125,
            importance_cv2: 0.0625,
            z_loss: 1.5,
            message_bytes_sent_per_call: 4096,
            payload_bytes_sent_per_call: 4000,
            message_bytes_received_per_call: 2048,
            payload_bytes_received_per_call: 2000,
            wall_mean_ms: 1.625,
            phases: PhaseFigures {
                gate_mean_ms: 0.125,
                gate_p99_ms: 0.25,
                plan_mean_ms: 0.0625,
                plan_p99_ms: 0.125,
                encode_mean_ms: 0.03125,
                encode_p99_ms: 0.0625,
                network_mean_ms: 0.75,
                network_p99_ms: 1.5,
                queue_wait_mean_ms: 0.1,
                queue_wait_p99_ms: 0.2,
                compute_mean_ms: 0.5,
                compute_p99_ms: 1.0,
                decode_mean_ms: 0.02,
                decode_p99_ms: 0.04,
                combine_mean_ms: 0.01,
                combine_p99_ms: 0.03,
            },
            step: None,
            errors: BTreeMap::new(),
            first_error: None,
            expert_load: Vec::new(),
            worker_load: BTreeMap::new(),
            ledger: Vec::new(),
            run: RunInfo::default(),
        }
    }

    #[test]
    fn a_closed_loop_run_reads_as_every_figure_in_its_place() {
        let expected = "\
cluster http://127.0.0.1:5000: 64 tokens/call, closed loop, concurrency 4, measured 10.0 s
  calls       200 ok, 0 failed
  throughput  1280 tokens/s (20.0 calls/s)
  latency     p50 1.500 ms  p90 2.250 ms  p95 2.500 ms  p99 3.125 ms  max 5.500 ms  (min 0.750 ms, mean 1.625 ms, stddev 0.500 ms)
  overflow    128 of 25600 assignments dropped (0.50%), 3 re-routed, 2 refused by full queues
  router      imbalance 1.250 (max/mean load) | switch aux loss 0.01250 | importance CV² 0.0625 | z-loss 1.5000
  bytes/call  sent 4096 B (4000 B payload), received 2048 B (2000 B payload)
  time/call   gate 0.125 ms | plan 0.062 ms | encode 0.031 ms | network 0.750 ms | queue_wait 0.100 ms | compute 0.500 ms | decode 0.020 ms | combine 0.010 ms | wall 1.625 ms
  p99/phase   gate 0.250 ms | plan 0.125 ms | encode 0.062 ms | network 1.500 ms | queue_wait 0.200 ms | compute 1.000 ms | decode 0.040 ms | combine 0.030 ms
";
        assert_eq!(load_report(&closed_loop()), expected);
    }

    /// An open loop names its rate; a report says when its calls ended well after the window,
    /// what arrivals it could not start, and why calls failed; bytes only when some were counted.
    #[test]
    fn an_open_loop_run_names_its_rate_its_late_end_its_dropped_arrivals_and_its_errors() {
        let open = LoadSummary {
            arrival: "open".into(),
            rate_calls_per_s: Some(50.0),
            elapsed_s: 10.2,
            failed: 4,
            dropped_arrivals: 7,
            errors: BTreeMap::from([("Unavailable".to_owned(), 3), ("Internal".to_owned(), 1)]),
            first_error: Some("worker w-1: Unavailable: connection refused".into()),
            message_bytes_sent_per_call: 0,
            ..closed_loop()
        };
        let report = load_report(&open);
        let head: Vec<&str> = report.lines().take(5).collect();
        assert_eq!(
            head,
            [
                "cluster http://127.0.0.1:5000: 64 tokens/call, open loop, 50 calls/s Poisson, measured 10.0 s (its calls \
                 ended 10.2 s after it began; rates are over that)",
                "  calls       200 ok, 4 failed, 7 arrivals dropped (--max-in-flight calls were out)",
                "    Internal: 1",
                "    Unavailable: 3",
                "    first error: worker w-1: Unavailable: connection refused",
            ]
        );
        assert!(!report.contains("bytes/call"), "{report}");

        let on_time = LoadSummary { elapsed_s: 10.1, dropped_arrivals: 0, ..open.clone() };
        let first = load_report(&on_time).lines().next().map(str::to_owned);
        assert_eq!(
            first.as_deref(),
            Some("cluster http://127.0.0.1:5000: 64 tokens/call, open loop, 50 calls/s Poisson, measured 10.0 s")
        );
        assert!(!load_report(&on_time).contains("arrivals dropped"));

        let ramp = LoadSummary { arrival: "ramp 10s:100,30s:500".into(), rate_calls_per_s: Some(400.0), ..on_time };
        let first = load_report(&ramp).lines().next().map(str::to_owned);
        assert_eq!(
            first.as_deref(),
            Some(
                "cluster http://127.0.0.1:5000: 64 tokens/call, open loop ramping through 10s:100,30s:500 calls/s (400.0 \
                 calls/s on average), measured 10.0 s"
            )
        );
    }

    #[test]
    fn a_whole_model_run_splits_its_step_and_lists_its_experts_and_ledger() {
        let means = PairMeans {
            requests: 1.0,
            rows: 96.0,
            payload_sent: 4000,
            payload_received: 2000,
            message_sent: 4096,
            message_received: 2048,
            socket_sent: 4200,
            socket_received: 2100,
            encode_us: 12.0,
            decode_us: 8.0,
            combine_us: 5.0,
            rpc_us: 700.0,
            dispatch_us: 90.0,
            combine_transfer_us: 60.0,
            queue_wait_us: 40.0,
            compute_us: 500.0,
            straggler_margin_us: 35.0,
        };
        let run = LoadSummary {
            step: Some(StepSplit {
                layers: 2,
                step_ms: 4.0,
                communication_ms: 1.0,
                expert_compute_ms: 2.0,
                client_compute_ms: 1.0,
                attention_ms: 0.5,
            }),
            expert_load: vec![30, 0, 98],
            ledger: vec![LedgerRow { layer: 1, worker: "w-0".into(), calls: 200, straggler_calls: 120, means }],
            ..closed_loop()
        };
        let report = load_report(&run);
        let tail: Vec<&str> = report.lines().skip(9).collect();
        assert_eq!(
            tail,
            [
                "  step        2 MoE layers, mean 4.000 ms: communication 1.000 ms (25%) | expert compute 2.000 ms (50%) | \
                 client compute 1.000 ms (25%, attention stand-in 0.500 ms)",
                "  per expert  30 0 98 assignments",
                "  ledger      per (layer → worker), means per call:",
                "  layer 1 → w-0: 96 rows | sent 4000 B payload, 4096 B message, 4200 B socket | received 2000 B payload, \
                 2048 B message, 2100 B socket",
                "      µs/call: encode 12 | dispatch 90 | queue 40 | compute 500 | combine-transfer 60 | decode 8 | combine 5 \
                 | rpc 700 | straggler in 120 of 200 calls (by 35 µs)",
            ]
        );
    }
}
