//! Running iproute2 and friends, with their stderr in the error.

use std::process::Command;

use crate::{Result, TestbedError};

/// Runs `program args…` and returns its stdout; a non-zero exit is an error carrying stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let rendered = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| TestbedError::Spawn {
            command: rendered.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(TestbedError::Command {
            command: rendered,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `ip args…`
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}
