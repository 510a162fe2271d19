//! CPU accounting from /proc: the whole machine (kernel softirq included) and single processes.

/// Clock ticks per second of /proc's counters (USER_HZ; 100 on every Linux ABI that matters).
fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// Busy CPU time of the whole machine, all CPUs summed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MachineCpu {
    /// user + nice + system + irq + softirq + steal, in seconds.
    pub busy_s: f64,
    /// softirq alone (where the kernel's network receive work is accounted), in seconds.
    pub softirq_s: f64,
}

impl MachineCpu {
    /// Reads `/proc/stat` now.
    pub fn now() -> Option<Self> {
        parse_proc_stat(
            &std::fs::read_to_string("/proc/stat").ok()?,
            ticks_per_second(),
        )
    }

    /// CPU spent between `earlier` and `self`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            busy_s: self.busy_s - earlier.busy_s,
            softirq_s: self.softirq_s - earlier.softirq_s,
        }
    }
}

/// Parses the aggregate `cpu` line of /proc/stat.
pub fn parse_proc_stat(text: &str, ticks_per_second: f64) -> Option<MachineCpu> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal …
    let field = |i: usize| fields.get(i).copied().unwrap_or(0.0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
    Some(MachineCpu {
        busy_s: busy / ticks_per_second,
        softirq_s: field(6) / ticks_per_second,
    })
}

/// user + system CPU seconds of process `pid` (0 if it is gone).
pub fn process_cpu_s(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|text| parse_pid_stat(&text, ticks_per_second()))
        .unwrap_or(0.0)
}

/// Parses utime + stime from /proc/<pid>/stat (the name may contain spaces and parentheses).
pub fn parse_pid_stat(text: &str, ticks_per_second: f64) -> Option<f64> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields after the name start at field 3 (state); utime is field 14, stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second)
}

/// Resident memory of process `pid` in KiB (from /proc/<pid>/status), 0 if gone.
pub fn process_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| parse_vm_rss_kib(&text))
        .unwrap_or(0)
}

/// Threads of `pid` (`Threads:` in /proc/<pid>/status); 0 when gone.
pub fn process_threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("Threads:"))?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_busy_excludes_idle_and_iowait() {
        let text = "cpu  100 10 50 1000 40 5 20 3 0 0\ncpu0 50 5 25 500 20 2 10 1 0 0\n";
        let cpu = parse_proc_stat(text, 100.0).unwrap();
        assert!((cpu.busy_s - 1.88).abs() < 1e-9, "{cpu:?}");
        assert!((cpu.softirq_s - 0.2).abs() < 1e-9);
    }

    #[test]
    fn pid_stat_survives_spaces_in_the_name() {
        let text = "4242 (stun nel) S 1 4242 4242 0 -1 4194560 300 0 0 0 250 75 0 0 20 0 3 0 1 2 3";
        assert!((parse_pid_stat(text, 100.0).unwrap() - 3.25).abs() < 1e-9);
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        assert_eq!(
            parse_vm_rss_kib("Name:\tx\nVmRSS:\t  1234 kB\n"),
            Some(1234)
        );
        assert_eq!(parse_vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_has_cpu_and_memory() {
        let pid = std::process::id();
        assert!(process_rss_kib(pid) > 0);
        assert!(MachineCpu::now().is_some());
    }
}
