//! The agent's log: tracing, as text or JSON, filtered by `VEIL_LOG`.
//!
//! The `log` bridge is installed too, because aya-log delivers the eBPF
//! programs' records through the `log` crate.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt};

/// Output format of the agent's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber; `VEIL_LOG` takes `tracing` filter directives (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("VEIL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
