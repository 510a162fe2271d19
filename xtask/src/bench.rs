//! `cargo xtask bench`: builds the harness in release mode and runs it.
//!
//! The load generator lives in the harness process, so it must not run as
//! debug code; the harness itself is `perf/` (`veil-bench`).

use anyhow::Result;

use crate::{
    ebpf, paths,
    shell::{self, step},
};

pub fn run(args: &[String]) -> Result<()> {
    let object = ebpf::build()?;
    step("Building the benchmark harness and the agent (release)");
    shell::run(
        shell::cargo()
            .current_dir(paths::repo_root())
            .env("VEIL_EBPF_OBJECT", &object)
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "veil-perf",
                "-p",
                "veil-agent",
                "-p",
                "veilctl",
            ]),
    )?;
    step("Running the benchmarks");
    shell::run(
        std::process::Command::new(paths::target_dir().join("release/veil-bench"))
            .current_dir(paths::repo_root())
            .env("VEIL_BIN_DIR", paths::target_dir().join("release"))
            .args(args),
    )
}

/// `cargo xtask bench-fanout`: the event fan-out benchmark (`veil-fanout`).
pub fn run_fanout(args: &[String]) -> Result<()> {
    let object = ebpf::build()?;
    step("Building the fan-out benchmark and the agent (release)");
    shell::run(
        shell::cargo()
            .current_dir(paths::repo_root())
            .env("VEIL_EBPF_OBJECT", &object)
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "veil-perf",
                "-p",
                "veil-agent",
                "-p",
                "veilctl",
            ]),
    )?;
    step("Running the fan-out benchmark");
    shell::run(
        std::process::Command::new(paths::target_dir().join("release/veil-fanout"))
            .current_dir(paths::repo_root())
            .env("VEIL_BIN_DIR", paths::target_dir().join("release"))
            .args(args),
    )
}
