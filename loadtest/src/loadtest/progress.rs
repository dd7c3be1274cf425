//! The load test's status line, redrawn four times a second while it runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Shared;

/// Redraws one status line four times a second: phase, calls, current throughput and p99.
pub(super) async fn show_progress(
    shared: Arc<Shared>,
    measure_from: Instant,
    deadline: Instant,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let bar = indicatif::ProgressBar::new(deadline.saturating_duration_since(measure_from).as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut stop => {
                bar.finish_and_clear();
                return;
            }
        }
        let now = Instant::now();
        let (tokens, calls, failed, p99) = {
            let report = shared.report.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            (report.tokens, report.calls, report.failed(), report.latency_at(0.99))
        };
        let rate = (tokens - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
        last = (now, tokens);
        if now < measure_from {
            bar.set_message("warming up");
            continue;
        }
        bar.set_position(now.saturating_duration_since(measure_from).as_millis() as u64);
        bar.set_message(format!(
            "{calls} calls, {failed} failed, {rate:.0} tokens/s now, p99 {:.1} ms",
            p99.as_secs_f64() * 1e3
        ));
    }
}
