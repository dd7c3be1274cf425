//! Bench reports as Markdown: the sweep table, the DeepEP table and the ledgers.

use std::fmt::Write as _;

use switchyard_router_client::ledger::LedgerRow;
use switchyard_router_client::timing::TimeBreakdown;

use super::folder::CHARTS;
use super::{LedgerCells, charts};
use crate::bench::cpu_time::CpuShares;
use crate::bench::wire::WireFigure;
use crate::bench::{BenchSummary, PointSummary, PresetSummary, Quantiles, StepSummary};

/// A measured value, formatted; a dash for one not measured.
fn optional<T>(value: Option<T>, format: impl FnOnce(T) -> String) -> String {
    value.map_or_else(|| "–".to_owned(), format)
}

/// A point's echo round trips in milliseconds, `raw TCP / gRPC` (a dash for one not measured).
fn round_trips(tcp_us: Option<f64>, grpc_us: Option<f64>) -> String {
    let milliseconds = |us: f64| format!("{:.2}", us / 1e3);
    format!("{} / {}", optional(tcp_us, milliseconds), optional(grpc_us, milliseconds))
}

/// The sweep table: one row per point.
pub fn sweep_table(points: &[PointSummary]) -> String {
    let mut text = String::new();
    let phases = TimeBreakdown::PHASES.join(" / ");
    let _ = writeln!(
        text,
        "| workers | experts | top-k | d_model x d_ff | tokens | wire | distributed ms | in-process ms | overhead | network ms (raw TCP echo / gRPC echo) | CPU µs per call distributed / in-process | tokens/s | B/token payload | B/token socket | % {phases} | expert GFLOP/s distributed / in-process | % of matmul peak distributed / in-process | output error |"
    );
    let _ = writeln!(text, "|{}", " ---: |".repeat(18));
    for point in points {
        let shape = point.point.shape;
        let shares: Vec<String> =
            point.phase_shares.values().iter().map(|share| format!("{:.0}", share * 100.0)).collect();
        let gflops = format!(
            "{} / {}",
            optional(point.distributed_expert_gflops, |g| format!("{g:.1}")),
            optional(point.reference_expert_gflops, |g| format!("{g:.1}"))
        );
        let percent = |share: Option<f64>| optional(share, |share| format!("{:.0}", share * 100.0));
        let peak_shares =
            format!("{} / {}", percent(point.distributed_peak_share), percent(point.reference_peak_share));
        let _ = writeln!(
            text,
            "| {} | {} | {} | {}x{} | {} | {} | {:.2} | {} | {} | {:.2} ({}) | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
            shape.workers,
            shape.experts,
            shape.top_k,
            shape.d_model,
            shape.d_ff,
            point.point.tokens,
            point.point.wire_dtype.name(),
            point.distributed_mean_ms,
            optional(point.reference_mean_ms, |ms| format!("{ms:.2}")),
            optional(point.overhead_ratio, |ratio| format!("{ratio:.2}x")),
            point.distributed.phases.network_mean_ms,
            round_trips(point.tcp_round_trip_us, point.grpc_round_trip_us),
            optional(point.cpu_per_call, |cpu| format!("{:.0} / {:.0}", cpu.distributed_us, cpu.in_process_us)),
            point.distributed.tokens_per_s,
            point.payload_bytes_per_token,
            point.socket_bytes_per_token,
            shares.join(" / "),
            gflops,
            peak_shares,
            optional(point.wire_error, |error| format!("{error:.1e}")),
        );
    }
    text
}

/// The DeepEP table: dispatch and combine beside the wire's limits.
pub fn preset_table(presets: &[PresetSummary]) -> String {
    let mut text = String::new();
    text.push_str("| preset | tokens | workers | rows/token (top-k) | logical MB/call | wire MB/call | dispatch µs: mean (p50 / p90 of the calls) | dispatch GB/s logical / wire (% of TCP; of TCP to every worker) | combine µs: mean (p50 / p90) | combine GB/s logical / wire (% of TCP; of TCP to every worker) | dispatch incl. encode µs | combine incl. decode + sum µs | gate GFLOP/s (% of tch f32 GEMM, same shape and threads), threads | cores busy during the calls (stolen) | request MB | TCP one-way GB/s | TCP N connections GB/s | TCP to every worker at once GB/s | TCP echo µs | gRPC one-way GB/s (tonic's client / as Forward goes: uncopied, own HTTP/2) | gRPC echo µs |\n");
    let _ = writeln!(text, "|{}", " ---: |".repeat(22));
    for preset in presets {
        let baselines = &preset.baselines;
        let share = |one: f64, every: Option<f64>| {
            let every = every.map_or_else(String::new, |every| format!("; {:.0}%", every * 100.0));
            format!("{:.0}%{every}", one * 100.0)
        };
        let _ = writeln!(
            text,
            "| {} | {} | {} | {:.2} ({}) | {:.1} | {:.1} | {:.0}{} | {:.2} / {:.2} ({}) | {:.0}{} | {:.2} / {:.2} ({}) | {:.0} | {:.0} | {:.1} ({}), {} | {} | {:.1} | {:.2} | {} | {} | {:.0} | {:.2} / {} | {:.0} |",
            preset.preset,
            preset.result.point.tokens,
            preset.result.point.shape.workers,
            preset.rows_per_token,
            preset.result.point.shape.top_k,
            preset.logical_mb_per_call,
            preset.result.distributed.payload_bytes_sent_per_call as f64 / 1e6,
            preset.dispatch_transfer_us,
            quantiles(preset.dispatch_quantiles_us),
            preset.logical_dispatch_gb_per_s,
            preset.dispatch_gb_per_s,
            share(preset.dispatch_share_of_tcp, preset.dispatch_share_of_tcp_to_every_worker),
            preset.combine_transfer_us,
            quantiles(preset.combine_quantiles_us),
            preset.logical_combine_gb_per_s,
            preset.combine_gb_per_s,
            share(preset.combine_share_of_tcp, preset.combine_share_of_tcp_to_every_worker),
            preset.dispatch_with_encode_us,
            preset.combine_with_decode_and_sum_us,
            preset.gate_gflops,
            optional(preset.gate_share_of_gemm, |share| format!("{:.0}%", share * 100.0)),
            preset.gate_threads,
            cpu_busy(preset.cpu),
            baselines.grpc_echo.bytes as f64 / 1e6,
            baselines.tcp_one_way.gb_per_s,
            optional(baselines.tcp_striped_one_way, |striped| format!(
                "{:.2} ({})",
                striped.gb_per_s, baselines.tcp_connections
            )),
            optional(preset.tcp_to_every_worker.map(|tcp| tcp.gb_per_s), |rate| format!("{rate:.2}")),
            baselines.tcp_echo.mean_us,
            baselines.grpc_one_way.gb_per_s,
            optional(baselines.grpc_one_way_uncopied.map(|figure| figure.gb_per_s), |rate| format!("{rate:.2}")),
            baselines.grpc_echo.mean_us,
        );
    }
    text
}

/// Each preset's fan-out baseline again, in the state a dispatch finds the machine in: right after
/// its cores were busy as long as a call's gate. Nothing where no preset measured it.
fn after_gate_lines(presets: &[PresetSummary]) -> String {
    let mut text = String::new();
    for preset in presets {
        let (Some(after), Some(share), Some(warm)) = (
            preset.tcp_to_every_worker_after_gate,
            preset.dispatch_share_of_tcp_to_every_worker_after_gate,
            preset.tcp_to_every_worker,
        ) else {
            continue;
        };
        let _ = writeln!(
            text,
            "- {}: raw TCP to every worker at once, each round right after every core was kept busy for \
             {:.1} ms (the calls' mean gate, spun in its place), {:.2} GB/s ({:.2} right after the previous \
             round); the dispatch, {:.2} GB/s, is {:.0}% of it.",
            preset.preset,
            after.busy_us / 1e3,
            after.figure.gb_per_s,
            warm.gb_per_s,
            preset.dispatch_gb_per_s,
            share * 100.0,
        );
    }
    if !text.is_empty() {
        text.push('\n');
    }
    text
}

/// ` (p50 / p90)` of a transfer's calls, or nothing where a report predates them.
fn quantiles(quantiles: Option<Quantiles>) -> String {
    quantiles.map_or_else(String::new, |quantiles| format!(" ({:.0} / {:.0})", quantiles.p50, quantiles.p90))
}

/// The cores' busy share while the calls ran, with the hypervisor's share beside it.
fn cpu_busy(cpu: Option<CpuShares>) -> String {
    optional(cpu, |cpu| format!("{:.0}% ({:.0}%)", cpu.busy * 100.0, cpu.stolen * 100.0))
}

/// Whole-model steps: the mean step of each, split three ways, distributed and in-process.
pub fn step_table(steps: &[StepSummary]) -> String {
    let mut text = String::from(
        "| link | cluster | MoE layers | tokens | attention stand-in | step ms (p99) | communication ms | expert compute ms | client compute ms (stand-in) | in-process step ms | overhead |\n",
    );
    let _ = writeln!(text, "|{}", " ---: |".repeat(11));
    for step in steps {
        let (distributed, reference) = (&step.distributed, &step.reference);
        let share = |part: f64| 100.0 * part / distributed.step_ms.max(1e-12);
        let _ = writeln!(
            text,
            "| {} | {} | {} | {} | {} | {:.2} ({:.2}) | {:.2} ({:.0}%) | {:.2} ({:.0}%) | {:.2} ({:.2}) | {:.2} | {:.2}x |",
            step.link_rate.map_or_else(|| "loopback".to_owned(), |rate| rate.to_string()),
            step.shape,
            step.layers,
            step.tokens,
            step.attention,
            distributed.step_ms,
            step.distributed_p99_ms,
            distributed.communication_ms,
            share(distributed.communication_ms),
            distributed.expert_compute_ms,
            share(distributed.expert_compute_ms),
            distributed.client_compute_ms,
            distributed.attention_ms,
            reference.step_ms,
            distributed.step_ms / reference.step_ms.max(1e-12),
        );
    }
    text
}

/// The presets on shaped links: dispatch and combine beside each link's floor.
pub fn link_table(presets: &[PresetSummary]) -> String {
    let mut text = String::from(
        "| link | preset | workers | dispatch µs (whole) | floor µs | ratio | Gbit/s on the busiest link (% of rate) | combine µs (whole) | floor µs | ratio | Gbit/s on the busiest link (% of rate) | raw TCP one way on one link, one request's bytes: Gbit/s (% of rate) | raw TCP one way on every link at once, a worker's bytes: Gbit/s per link (% of rate) | cores busy during the calls (stolen) |\n",
    );
    let _ = writeln!(text, "|{}", " ---: |".repeat(14));
    for preset in presets {
        let (Some(link), Some(dispatch_floor), Some(combine_floor), Some((dispatch_ratio, combine_ratio))) =
            (&preset.link_rate, preset.dispatch_floor_us, preset.combine_floor_us, preset.floor_ratios())
        else {
            continue;
        };
        let rate = link.bits_per_second() as f64;
        // The floor is bytes over the rate: the achieved rate is the floor's share of the time.
        let achieved = |ratio: f64| format!("{:.2} ({:.0}%)", rate / ratio / 1e9, 100.0 / ratio);
        let tcp_share = |tcp: Option<WireFigure>| {
            optional(tcp, |tcp| format!("{:.2} ({:.0}%)", tcp.gb_per_s * 8.0, tcp.gb_per_s * 8e9 / rate * 100.0))
        };
        let _ = writeln!(
            text,
            "| {link} | {} | {} | {:.0} | {:.0} | {:.2} | {} | {:.0} | {:.0} | {:.2} | {} | {} | {} | {} |",
            preset.preset,
            preset.result.point.shape.workers,
            preset.dispatch_span_us,
            dispatch_floor,
            dispatch_ratio,
            achieved(dispatch_ratio),
            preset.combine_span_us,
            combine_floor,
            combine_ratio,
            achieved(combine_ratio),
            tcp_share(preset.link_tcp),
            tcp_share(preset.links_tcp_at_once),
            cpu_busy(preset.cpu),
        );
    }
    text
}

/// A ledger as a table: per (layer → worker), means per call (the whole RPC is left out: the
/// columns before it add up to it).
pub fn ledger_table(rows: &[LedgerRow]) -> String {
    let mut text = String::from("| layer → worker | rows |");
    for (kind, _, _) in LedgerCells::of(&LedgerRow::default()).bytes {
        let _ = write!(text, " {kind} B sent / received |");
    }
    for (step, _) in &LedgerCells::of(&LedgerRow::default()).micros[..7] {
        let _ = write!(text, " {step} µs |");
    }
    text.push_str(" straggler in |\n");
    let _ = writeln!(text, "| --- |{}", " ---: |".repeat(12));
    for cells in rows.iter().map(LedgerCells::of) {
        let bytes: Vec<String> = cells.bytes.iter().map(|(_, sent, received)| format!("{sent} / {received}")).collect();
        let micros: Vec<&str> = cells.micros[..7].iter().map(|(_, value)| value.as_str()).collect();
        let _ = writeln!(
            text,
            "| {} | {} | {} | {} | {} |",
            cells.pair.trim_start_matches("layer "),
            cells.rows,
            bytes.join(" | "),
            micros.join(" | "),
            cells.straggler
        );
    }
    text
}

/// The whole report: `report.md`.
pub fn bench_report(summary: &BenchSummary) -> String {
    let mut text = String::from("# Switchyard bench report\n\n");
    let _ = writeln!(text, "Command: `{}`\n\nMachine: {}\n", summary.command, summary.machine);
    if let Some(wake) = summary.thread_wake {
        let _ = writeln!(
            text,
            "Thread wake round trip, measured at the start of this run (a condvar ping-pong between two \
             threads, {} round trips): p50 {:.0} µs, p90 {:.0} µs. Every hop of a call between threads or \
             processes costs about half of it when the core it wakes was idle: the floor of small calls.\n",
            wake.round_trips, wake.p50_us, wake.p90_us
        );
    }
    for peak in &summary.device_peaks {
        let _ = writeln!(
            text,
            "Matmul peak, measured in this run: {} {} with {} thread(s), {}³: {:.1} GFLOP/s\n",
            peak.device, peak.dtype, peak.threads, peak.size, peak.gflops
        );
    }
    let _ = writeln!(text, "Settings: `{}`\n", summary.settings);
    if !summary.points.is_empty() {
        text.push_str("## Sweep\n\n");
        text.push_str(
            "Each point ran through a local cluster (distributed) and, in the same run, through the in-process \
             reference layer on the same inputs, the two taking turns in five rounds so that both run under the \
             same conditions of the machine. Overhead = distributed ÷ in-process mean time per call. The network \
             phase (mean per call, the straggler's) stands beside a raw TCP echo of one request's bytes \
             between two threads, the least a round trip costs here, and a plain gRPC echo of the same bytes \
             (tonic's generated client and server, the same transport settings), what tonic and h2 alone cost, \
             both measured in the same rounds. \
             CPU per call is what the bench's process, the coordinator and the workers together spent on a \
             CPU over the measured calls, per call (this process's CPU clock, the others' threads' scheduler \
             statistics): beyond the wall time, what the sockets' system calls and the wakes of parked \
             threads cost the machine. \
             Bytes per token count both directions. Phase shares are of the mean wall time (they add up to it). \
             GFLOP/s is expert FLOPs over expert compute time, and % of matmul peak divides it by the \
             device's square-matmul rate measured in this run in the experts' dtype (per worker: at one \
             worker's thread count; in-process: at all workers' threads together). Output error is the relative Frobenius distance \
             of one distributed call from the reference (it shows what the wire dtype costs).\n\n",
        );
        text.push_str(&sweep_table(&summary.points));
        text.push('\n');
        for (file, title) in CHARTS {
            let _ = writeln!(text, "![{title}]({file})\n");
        }
        if let Some(base) = summary.points.first() {
            let _ = writeln!(text, "### Ledger of the first point ({})\n", charts::point_label(base));
            text.push_str(&ledger_table(&base.distributed.ledger));
            text.push('\n');
        }
    }
    if !summary.presets.is_empty() {
        text.push_str(&presets_section(summary));
    }
    if !summary.steps.is_empty() {
        text.push_str("## Whole-model steps\n\n");
        text.push_str(
            "Each call runs its tokens through every MoE layer in order, the attention stand-in before each; the \
             mean step splits into communication (RPC time not spent in the workers), expert compute (compute, \
             queue wait, batching) and client compute (gate, planning, encode, decode, combine, the stand-in). \
             The in-process reference runs the same steps with as many libtorch threads as all workers together.\n\n",
        );
        text.push_str(&step_table(&summary.steps));
        text.push('\n');
    }
    text
}

/// The DeepEP presets: what they are, their table, the fan-out after the gate, links and ledgers.
fn presets_section(summary: &BenchSummary) -> String {
    let mut text = String::new();
    text.push_str("## DeepEP settings: dispatch and combine alone\n\n");
    text.push_str(
        "Identity experts (no compute, the same bytes back), hidden 7168, top-8 of 256 experts, bf16 both ways \
         (DeepEP dispatches FP8 and combines BF16), capacity large enough that nothing drops. ",
    );
    // Reports written before the setting existed overlapped.
    text.push_str(if summary.settings["preset_overlap"].as_bool() == Some(false) {
        "Each worker computes once a call's whole dispatch is in, as DeepEP's normal kernels do (dispatch, then \
         experts, then combine), so dispatch and combine are timed each alone, as DeepEP's tests time them. "
    } else {
        "Each worker starts on every request of a call as it arrives (`--preset-overlap`): on a machine short of \
         cores, the transfers still running share them with the stand-in compute. "
    });
    text.push_str(
        "Dispatch is the \
         slowest worker's request transfer per call (client send → worker handler), combine the way back \
         (worker reply → client has the answer); GB/s is the call's payload in that direction over that time. \
         The baselines move one request's payload over TCP and a plain gRPC echo on this machine's loopback, \
         in the same run; the single-connection TCP figure the percentages divide by is measured between \
         the preset's calls (in 5 rounds, each after a fifth of the calls), because this machine's loopback \
         swings several-fold within seconds. After each round, too, raw TCP moves the busiest worker's \
         bytes of a call to as many receivers as there are workers, each over its connection of its own, \
         all written at once by threads of one process: the dispatch's fan-out with the TCP stack alone \
         (the second percentage divides by it), and then the same again, each round right after every \
         core was kept busy as long as the calls' gate, as a dispatch finds the machine (the lines under \
         the table). Cores busy: the share of every core's time the kernel counted \
         busy while the preset's calls ran, its warm-up calls included (the hypervisor's stolen share in \
         brackets): near 100%, the machine's cores, not its wire, set the pace.\n\n",
    );
    text.push_str(&preset_table(&summary.presets));
    text.push('\n');
    text.push_str(&after_gate_lines(&summary.presets));
    if summary.presets.iter().any(|preset| preset.link_rate.is_some()) {
        text.push_str("### On shaped links\n\n");
        // Reports written before the setting existed ran this machine's own.
        let congestion = match summary.settings["link_congestion"].as_str() {
            Some(name) if name != "machine" => format!("TCP congestion control {name} on every host"),
            _ => "the measuring machine's default TCP congestion control on every host".to_owned(),
        };
        let _ = write!(
            text,
            "Each worker on a host of its own (a network namespace) behind a veth link shaped by tbf to the rate \
             in each direction, the client in another, {congestion}. "
        );
        text.push_str(
            "The floor is the busiest link's socket bytes per call over \
             the rate (TCP/IP/Ethernet headers come on top: ~95% of the rate is the most a transfer reaches). \
             Dispatch here is the whole transfer of one worker's requests (the first sent → the last in its \
             handler) and combine of its answers (its first reply → the client has the last), the longest \
             worker's per call. A ratio of 1.25 is 80% of the line rate. Raw TCP on every link at once is the \
             most this client's machine moves to all its workers together, with no gate, encode or expert beside \
             it.\n\n",
        );
        text.push_str(&link_table(&summary.presets));
        let (file, title) = super::folder::LINK_CHART;
        let _ = writeln!(text, "\n![{title}]({file})\n");
    }
    for preset in &summary.presets {
        let _ = writeln!(text, "### Ledger: {}\n", preset.preset);
        text.push_str(&ledger_table(&preset.result.distributed.ledger));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::process_cpu::CpuPerCall;

    fn published_report() -> BenchSummary {
        published("sweep")
    }

    fn published(folder: &str) -> BenchSummary {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../docs/bench/{folder}/report.json"));
        serde_json::from_str(&std::fs::read_to_string(&path).expect("a published report.json")).expect("a report")
    }

    #[test]
    fn the_sweep_table_gives_each_points_cpu_per_call_where_it_was_measured() {
        let mut summary = published_report();
        let mut points = summary.points.drain(..1).collect::<Vec<_>>();
        points[0].cpu_per_call = Some(CpuPerCall { distributed_us: 812.4, in_process_us: 603.6 });
        let measured = sweep_table(&points);
        let row = measured.lines().nth(2).expect("a row");
        assert_eq!(row.split(" | ").nth(10), Some("812 / 604"), "{row}");
        assert_eq!(measured.lines().next().map(|header| header.split(" | ").count()), Some(row.split(" | ").count()));
        points[0].cpu_per_call = None;
        let unmeasured = sweep_table(&points);
        assert_eq!(unmeasured.lines().nth(2).and_then(|row| row.split(" | ").nth(10)), Some("–"));
    }

    #[test]
    fn the_links_paragraph_names_the_hosts_congestion_control() {
        let mut summary = published("links");
        summary.settings["link_congestion"] = serde_json::Value::from("dctcp");
        let named = bench_report(&summary);
        assert!(named.contains("TCP congestion control dctcp on every host"), "{named}");
        summary.settings["link_congestion"] = serde_json::Value::from("machine");
        assert!(bench_report(&summary).contains("the measuring machine's default TCP congestion control"));
        summary.settings.as_object_mut().expect("settings").remove("link_congestion");
        assert!(bench_report(&summary).contains("the measuring machine's default TCP congestion control"));
    }

    #[test]
    fn the_presets_paragraph_says_whether_compute_overlapped_the_dispatch() {
        let mut summary = published_report();
        summary.settings["preset_overlap"] = serde_json::Value::Bool(false);
        let alone = bench_report(&summary);
        assert!(alone.contains("once a call's whole dispatch is in"), "{alone}");
        assert!(!alone.contains("`--preset-overlap`"), "{alone}");
        summary.settings["preset_overlap"] = serde_json::Value::Bool(true);
        let overlapped = bench_report(&summary);
        assert!(overlapped.contains("`--preset-overlap`"), "{overlapped}");
        assert!(!overlapped.contains("once a call's whole dispatch is in"), "{overlapped}");
    }
}
