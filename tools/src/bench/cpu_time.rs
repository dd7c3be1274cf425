//! How busy this machine's cores were while a preset's calls ran, from the kernel's own counters
//! (`/proc/stat`): a transfer below its link's or the TCP baseline's rate with every core busy is
//! bound by the machine, not by the wire.

/// The kernel's CPU time counters summed over every core, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Running anything: user, nice, system, interrupts.
    busy: u64,
    /// Taken by the hypervisor from this virtual machine.
    stolen: u64,
    /// Idle, or idle waiting for I/O.
    idle: u64,
}

impl CpuTimes {
    /// The counters now; none where `/proc/stat` cannot be read (not Linux).
    pub fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// From `/proc/stat`'s first line: `cpu user nice system idle iowait irq softirq steal ...`.
    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().next()?;
        let mut fields = line.split_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let ticks: Vec<u64> = fields.take(8).map(str::parse).collect::<Result<_, _>>().ok()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks.try_into().ok()?;
        Some(Self { busy: user + nice + system + irq + softirq, stolen: steal, idle: idle + iowait })
    }
}

/// Core time over one or more spans: what share of it was busy, and stolen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuUsage {
    busy: u64,
    stolen: u64,
    total: u64,
}

impl CpuUsage {
    /// Adds the span between two readings (nothing when either is missing).
    pub fn add(&mut self, before: Option<CpuTimes>, after: Option<CpuTimes>) {
        let (Some(before), Some(after)) = (before, after) else { return };
        let busy = after.busy.saturating_sub(before.busy);
        let stolen = after.stolen.saturating_sub(before.stolen);
        self.busy += busy;
        self.stolen += stolen;
        self.total += busy + stolen + after.idle.saturating_sub(before.idle);
    }

    /// The busy and stolen shares of all core time, none when nothing was measured.
    pub fn shares(self) -> Option<CpuShares> {
        (self.total > 0).then(|| CpuShares {
            busy: self.busy as f64 / self.total as f64,
            stolen: self.stolen as f64 / self.total as f64,
        })
    }
}

/// Shares of all cores' time over the measured spans.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CpuShares {
    pub busy: f64,
    pub stolen: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_summed_line_and_counts_shares_over_spans() {
        let at = |user: u64, idle: u64, steal: u64| {
            CpuTimes::parse(&format!("cpu  {user} 3 10 {idle} 5 1 2 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n"))
        };
        let first = at(100, 1000, 0);
        assert_eq!(first, Some(CpuTimes { busy: 116, stolen: 0, idle: 1005 }));
        let mut usage = CpuUsage::default();
        // 60 ticks busy, 20 stolen, 20 idle.
        usage.add(first, at(160, 1020, 20));
        let shares = usage.shares().expect("measured");
        assert!((shares.busy - 0.6).abs() < 1e-12 && (shares.stolen - 0.2).abs() < 1e-12, "{shares:?}");
        // A span without readings adds nothing.
        usage.add(None, at(0, 0, 0));
        assert_eq!(usage.shares(), Some(shares));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn linux_gives_its_counters() {
        let (before, after) = (CpuTimes::now().expect("/proc/stat"), CpuTimes::now().expect("/proc/stat"));
        assert!(after.busy >= before.busy && after.idle >= before.idle && before.busy + before.idle > 0);
    }

    #[test]
    fn nothing_measured_and_foreign_text_give_no_figure() {
        assert_eq!(CpuUsage::default().shares(), None);
        assert_eq!(CpuTimes::parse("intr 1 2 3\n"), None);
        assert_eq!(CpuTimes::parse("cpu 1 2 three 4 5 6 7 8\n"), None);
        assert_eq!(CpuTimes::parse("cpu 1 2 3\n"), None);
    }
}
