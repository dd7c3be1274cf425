//! What every process's `/metrics` carries besides its own figures: the standard `process_*`
//! metrics (CPU, memory, file descriptors, threads, start time; read from `/proc` at each scrape,
//! named as every Prometheus client library names them) and `switchyard_build_info`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Registers the process metrics and `switchyard_build_info{component, version}` on `registry`
/// (at its root: these names carry no component prefix, by convention).
pub fn register(registry: &mut Registry, component: &'static str) {
    registry.register_collector(Box::new(ProcessCollector));
    registry.register(
        "switchyard_build",
        "The running build: its component and version",
        Info::new(vec![("component", component), ("version", env!("CARGO_PKG_VERSION"))]),
    );
}

/// Reads `/proc/self` at each scrape; on a system without it, writes nothing.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(me) = procfs::process::Process::myself() else {
            return Ok(());
        };
        let mut gauge = |name: &str, help: &str, value: f64| -> Result<(), std::fmt::Error> {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
        };
        if let Ok(stat) = me.stat() {
            let ticks = procfs::ticks_per_second() as f64;
            gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                (stat.rss * procfs::page_size()) as f64,
            )?;
            gauge("process_virtual_memory_bytes", "Virtual memory size in bytes", stat.vsize as f64)?;
            gauge("process_threads", "Number of OS threads in the process", stat.num_threads as f64)?;
            if let Ok(boot) = procfs::boot_time_secs() {
                gauge(
                    "process_start_time_seconds",
                    "Start time of the process since the Unix epoch in seconds",
                    boot as f64 + stat.starttime as f64 / ticks,
                )?;
            }
            if let Ok(fds) = me.fd_count() {
                gauge("process_open_fds", "Number of open file descriptors", fds as f64)?;
            }
            if let Ok(limits) = me.limits()
                && let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit
            {
                gauge("process_max_fds", "Maximum number of open file descriptors", max as f64)?;
            }
            let cpu = ConstCounter::new((stat.utime + stat.stime) as f64 / ticks);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                cpu.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant, SystemTime};

    use super::*;

    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    }

    fn scrape() -> String {
        let mut registry = Registry::default();
        register(&mut registry, "test");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        text
    }

    /// This process's user and system CPU time so far, as the kernel's accounting has it.
    #[allow(unsafe_code)]
    fn cpu_seconds() -> f64 {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes the struct it is given, which lives through the call.
        let usage = unsafe {
            assert_eq!(libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()), 0);
            usage.assume_init()
        };
        let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 * 1e-6;
        seconds(usage.ru_utime) + seconds(usage.ru_stime)
    }

    #[test]
    fn cpu_time_counts_user_and_system_time_and_the_start_is_this_process_s() {
        // Both kinds of CPU time, well above the 10 ms a clock tick counts: metadata calls are
        // mostly the kernel's time, the sums the process's own.
        let started = Instant::now();
        let mut sum = 0u64;
        while started.elapsed() < Duration::from_millis(300) {
            for _ in 0..100 {
                sum = sum.wrapping_add(std::fs::metadata("/").map_or(0, |meta| meta.len()));
            }
            for i in 0..20_000u64 {
                sum = std::hint::black_box(sum.wrapping_mul(31).wrapping_add(i));
            }
        }
        std::hint::black_box(sum);
        let before = cpu_seconds();
        let text = scrape();
        let after = cpu_seconds();
        let cpu = sample(&text, "process_cpu_seconds_total");
        // /proc counts in clock ticks (10 ms here) what getrusage counts in microseconds.
        assert!(before - 0.03 <= cpu && cpu <= after + 0.03, "{cpu} s of CPU, not within [{before}, {after}]");

        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_secs_f64();
        let start = sample(&text, "process_start_time_seconds");
        // The boot time /proc gives is whole seconds; a test binary runs for minutes at most.
        assert!(now - 900.0 < start && start <= now + 2.0, "started at {start}, now {now}");
    }

    #[test]
    fn the_process_and_its_build_are_described() {
        let text = scrape();
        for line_start in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_threads ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(line_start), "{line_start} missing from:\n{text}");
        }
        let rss = sample(&text, "process_resident_memory_bytes");
        assert!(rss > 1e6, "a test process holds more than 1 MB: {rss}");
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!("switchyard_build_info{{component=\"test\",version=\"{version}\"}} 1")),
            "{text}"
        );
    }
}
