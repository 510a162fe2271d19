//! Building the eBPF object with Debian's rustc-web and build-std.
//!
//! rustup's toolchains here ship no rust-src, so `-Z build-std` needs the
//! Debian toolchain, called by full path because rustup's proxies come first
//! on PATH. `RUSTC_BOOTSTRAP=1` unlocks build-std on that stable compiler.

use std::{path::PathBuf, process::Command};

use anyhow::{Result, ensure};

use crate::{
    paths, setup,
    shell::{self, step},
};

/// Environment of the outer cargo that must not leak into the eBPF build.
const OUTER_CARGO_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_TARGET",
    "RUSTUP_TOOLCHAIN",
];

/// Builds the programs and returns the object's path.
pub fn build() -> Result<PathBuf> {
    setup::ensure_toolchain()?;
    step("Building the eBPF programs (bpfel-unknown-none)");
    let mut command = Command::new("/usr/bin/cargo");
    for name in OUTER_CARGO_ENV {
        command.env_remove(name);
    }
    shell::run(
        command
            .current_dir(paths::repo_root().join("ebpf"))
            .env("RUSTC_BOOTSTRAP", "1")
            .env("RUSTC", "/usr/bin/rustc")
            .env("RUSTDOC", "/usr/bin/rustdoc")
            .env("CARGO_TARGET_DIR", paths::ebpf_target_dir())
            .args(["build", "--release"]),
    )?;
    let object = paths::ebpf_object();
    ensure!(
        object.is_file(),
        "the eBPF build succeeded but {} is missing",
        object.display()
    );
    Ok(object)
}
