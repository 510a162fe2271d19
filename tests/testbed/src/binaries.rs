//! Finding the workspace's binaries (veil-agent, veilctl) from a test or xtask.

use std::path::PathBuf;

use crate::{Result, TestbedError};

/// Path of the workspace binary `name`.
///
/// `VEIL_BIN_DIR` wins when set; otherwise the binary is looked for next to
/// the running executable and one level up (tests live in `target/<profile>/deps`).
pub fn locate(name: &str) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("VEIL_BIN_DIR") {
        candidates.push(PathBuf::from(dir).join(name));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join(name));
        }
    }
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| {
            TestbedError::Invalid(format!(
                "cannot find the `{name}` binary (looked in {}): build it with \
                 `cargo build -p {name}` (`cargo xtask test` does) or set VEIL_BIN_DIR",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}
