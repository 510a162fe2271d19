//! Running iproute2 and friends, with their stderr in the error.

use std::process::Command;

use crate::{Result, TestbedError};

/// Runs `command` (called `label` in errors) and returns its stdout; a
/// non-zero exit is an error carrying stderr.
pub fn output_of(command: &mut Command, label: &str) -> Result<String> {
    let output = command.output().map_err(|source| TestbedError::Spawn {
        command: label.into(),
        source,
    })?;
    if !output.status.success() {
        return Err(TestbedError::Command {
            command: label.into(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `program args…` and returns its stdout.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    output_of(
        Command::new(program).args(args),
        &format!("{program} {}", args.join(" ")),
    )
}

/// `ip args…`
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}
