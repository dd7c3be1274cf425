//! Where the figures were measured: the CPU, its cores, the GPUs, the guest's halt polling.

/// CPU model and core count, for the report's header.
pub(super) fn machine_summary() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let cuda = if tch::Cuda::is_available() {
        format!("CUDA: {}", gpu_names().unwrap_or_else(|| format!("{} device(s)", tch::Cuda::device_count())))
    } else {
        "no CUDA".to_owned()
    };
    // KVM guests' cpuidle-haltpoll: at 0 an idle core halts at once and every wake of a thread on
    // it waits for the host (a condvar round trip ~10x slower than with polling, on the machine
    // this was written on).
    let halt_polling = std::fs::read_to_string("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
        .map(|nanos| format!(", guest halt polling {} ns", nanos.trim()))
        .unwrap_or_default();
    format!("{cpu}, {cores} cores available, {cuda}{halt_polling}")
}

/// The GPUs' names as `nvidia-smi` reports them, when it is there.
fn gpu_names() -> Option<String> {
    let output =
        std::process::Command::new("nvidia-smi").args(["--query-gpu=name", "--format=csv,noheader"]).output().ok()?;
    let names = String::from_utf8_lossy(&output.stdout).lines().map(str::trim).collect::<Vec<_>>().join(", ");
    (output.status.success() && !names.is_empty()).then_some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_names_the_cpu_its_cores_and_whether_cuda_is_there() {
        let summary = machine_summary();
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        assert!(summary.contains(&format!(", {cores} cores available, ")), "{summary}");
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if let Some((_, model)) =
            cpuinfo.lines().find(|line| line.starts_with("model name")).and_then(|line| line.split_once(':'))
        {
            assert!(summary.starts_with(&format!("{}, ", model.trim())), "{summary}");
        }
        assert_eq!(summary.contains("no CUDA"), !tch::Cuda::is_available(), "{summary}");
    }
}
