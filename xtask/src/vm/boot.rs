//! Booting one VM and following its console.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{
    initramfs::{EXIT_MARKER, JOB_TAG, ROOT_TAG},
    kernels::Kernel,
};

/// What one suite did in the VM.
pub struct SuiteOutcome {
    pub name: String,
    pub code: i32,
    pub seconds: u64,
    /// libtest's last `test result:` line.
    pub summary: String,
}

/// What the VM did.
pub struct Outcome {
    /// The plan's exit code; `None` when the VM ended without one.
    pub code: Option<i32>,
    pub suites: Vec<SuiteOutcome>,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.code == Some(0) && self.suites.iter().all(|s| s.code == 0)
    }
}

/// Boots `kernel` with `initrd`, the host's `/` and `job` shared, and
/// prints the console (without the kernel's own messages) as it comes.
pub fn run(kernel: &Kernel, initrd: &Path, job: &Path, timeout: Duration) -> Result<Outcome> {
    let started = Instant::now();
    let mut child = Command::new("timeout")
        .args(["--kill-after=10", &timeout.as_secs().to_string()])
        .arg("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048"])
        .args([
            "-bios",
            "/usr/share/qemu/qboot.rom",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3",
            "-virtfs",
            &format!(
                "local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap"
            ),
            "-virtfs",
        ])
        .arg(format!(
            "local,path={},mount_tag={JOB_TAG},security_model=none",
            job.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start qemu-system-x86_64 (`cargo xtask setup` installs it)")?;
    let console = child.stdout.take().context("qemu has no stdout")?;
    let mut outcome = Outcome {
        code: None,
        suites: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for line in BufReader::new(console).lines() {
        let line = line.unwrap_or_default();
        let line = line.trim_end_matches('\r');
        if let Some(code) = line.trim().strip_prefix(EXIT_MARKER) {
            outcome.code = code.trim().parse().ok();
        } else if let Some(start) = line.strip_prefix("VEIL-VM-SUITE-START ") {
            println!("    [{:>4.0}s] {start} …", started.elapsed().as_secs_f64());
        } else if let Some(end) = line.strip_prefix("VEIL-VM-SUITE-END ") {
            let mut fields = end.splitn(4, ' ');
            let suite = SuiteOutcome {
                name: fields.next().unwrap_or_default().to_string(),
                code: fields.next().and_then(|c| c.parse().ok()).unwrap_or(-1),
                seconds: fields.next().and_then(|s| s.parse().ok()).unwrap_or(0),
                summary: fields.next().unwrap_or_default().to_string(),
            };
            println!(
                "    [{:>4.0}s] {} {} ({}s) {}",
                started.elapsed().as_secs_f64(),
                suite.name,
                if suite.code == 0 { "ok" } else { "FAILED" },
                suite.seconds,
                suite.summary
            );
            outcome.suites.push(suite);
        } else if !line.starts_with('[') && !line.trim().is_empty() {
            // What the plan prints (a failure's excerpt, the kernel's
            // version), not the kernel's boot messages.
            println!("    vm| {line}");
        }
    }
    let status = child.wait().context("cannot wait for qemu")?;
    outcome.elapsed = started.elapsed();
    if outcome.code.is_none() {
        println!(
            "    the VM ended without finishing its plan (qemu {status}; {} after {:.0?})",
            if outcome.elapsed >= timeout {
                "timed out"
            } else {
                "no exit line"
            },
            outcome.elapsed
        );
    }
    Ok(outcome)
}
