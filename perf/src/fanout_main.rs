//! `veil-fanout`: the event fan-out benchmark (publish → applied on every
//! agent). `cargo xtask bench-fanout` builds it in release mode and runs it.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use veil_perf::fanout::{self, FanoutOptions};

/// Publish pod events at a fixed rate to agents on a real broker and report
/// the publish → applied latency on every agent and the agents' CPU.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Agents (nodes), each in its own consumer group.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=8))]
    agents: u8,
    /// Events per second.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    rate: u32,
    /// Seconds of publishing (default: 30; 10 with --quick).
    #[arg(long)]
    seconds: Option<u64>,
    /// 10 seconds of publishing.
    #[arg(long)]
    quick: bool,
    /// Directory for the JSON and the report.
    #[arg(long, default_value = "perf/results")]
    output: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut options = FanoutOptions::new(cli.output, cli.quick);
    options.agents = usize::from(cli.agents);
    options.rate = cli.rate;
    if let Some(seconds) = cli.seconds {
        options.duration = Duration::from_secs(seconds.clamp(1, 600));
    }
    match fanout::run(&options) {
        Ok((results, report)) => {
            print!("{}", fanout::markdown(&results));
            println!("\nreport: {}", report.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
