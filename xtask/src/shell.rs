//! Running commands with a visible step line and errors that say what failed.

use std::{process::Command, time::Instant};

use anyhow::{Context, Result, bail};

/// Prints a step header, the way every xtask command announces its progress.
pub fn step(what: &str) {
    println!("\x1b[1m==> {what}\x1b[0m");
}

/// Runs `command` with inherited output; fails with the command line if it fails.
pub fn run(command: &mut Command) -> Result<()> {
    let rendered = render(command);
    let started = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("cannot start `{rendered}`"))?;
    if !status.success() {
        bail!(
            "`{rendered}` failed ({status}) after {:.0?}",
            started.elapsed()
        );
    }
    Ok(())
}

/// Runs `command` quietly and returns its stdout, or `None` if it cannot run or fails.
pub fn output(command: &mut Command) -> Option<String> {
    let output = command.output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The user-facing cargo (rustup's stable), as cargo passed it to us.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn render(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
