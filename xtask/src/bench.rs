//! `cargo xtask bench`: builds the harness in release mode and runs it.
//!
//! The load generator lives in the harness process, so it must not run as
//! debug code; the harness itself is `perf/` (`veil-bench`).

use anyhow::Result;

use crate::{
    ebpf, paths,
    shell::{self, step},
};

/// `cargo xtask bench`: the datapath benchmarks (`veil-bench`).
pub fn run(args: &[String]) -> Result<()> {
    build_and_run("veil-bench", "the benchmarks", args)
}

/// `cargo xtask bench-fanout`: the event fan-out benchmark (`veil-fanout`).
pub fn run_fanout(args: &[String]) -> Result<()> {
    build_and_run("veil-fanout", "the fan-out benchmark", args)
}

/// `cargo xtask bench-identity`: certificate signing and pod → certificate
/// ready against a real API server (`veil-identity-bench`).
pub fn run_identity(args: &[String]) -> Result<()> {
    crate::kube::ensure_kube_binaries()?;
    build_and_run("veil-identity-bench", "the identity benchmark", args)
}

/// Builds the harness (`binary`, in `perf/`) with the agent and veilctl in
/// release mode, then runs it with `args` against those release binaries.
fn build_and_run(binary: &str, what: &str, args: &[String]) -> Result<()> {
    let object = ebpf::build()?;
    step(&format!("Building {what} and the agent (release)"));
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
                "-p",
                "veil-controller",
            ]),
    )?;
    step(&format!("Running {what}"));
    shell::run(
        std::process::Command::new(paths::target_dir().join("release").join(binary))
            .current_dir(paths::repo_root())
            .env("VEIL_BIN_DIR", paths::target_dir().join("release"))
            .args(args),
    )
}
