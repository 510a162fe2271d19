//! `veil-bench`: the benchmark harness binary. `cargo xtask bench` builds it
//! in release mode (our own load generator must not be measured in debug
//! code) and runs it.

use std::{path::PathBuf, process::ExitCode, sync::atomic::Ordering};

use clap::Parser;
use veil_perf::{BenchOptions, Workload};

/// Run every Veil datapath configuration side by side and write a report.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Run only these scenarios (repeatable): throughput-1, throughput-4,
    /// latency-1b, latency-1k, connections, proxy-memory.
    #[arg(long = "scenario", value_name = "SCENARIO")]
    scenarios: Vec<Workload>,
    /// Measure only these configurations (repeatable): direct, direct-xdp,
    /// kernel-vxlan, kernel-vxlan-xdp, veil-overlay, veil-overlay-vxlan-device,
    /// veil-mtls-userspace, veil-mtls-ktls, stunnel. The baseline, direct,
    /// is always measured.
    #[arg(long = "configuration", value_name = "CONFIGURATION")]
    configurations: Vec<veil_perf::Configuration>,
    /// Shorter runs and 3 repetitions: under 3 minutes on 2 cores.
    #[arg(long)]
    quick: bool,
    /// Repetitions of each measurement (default: 3 quick, 5 full).
    #[arg(long)]
    repetitions: Option<u32>,
    /// Directory for the JSON, the report and the plots.
    #[arg(long, default_value = "perf/results")]
    output: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut options = if cli.quick {
        BenchOptions::quick(cli.output)
    } else {
        BenchOptions::full(cli.output)
    };
    if !cli.scenarios.is_empty() {
        options.workloads = cli.scenarios;
    }
    options.configurations = cli.configurations;
    if let Some(repetitions) = cli.repetitions {
        options.repetitions = repetitions.max(1);
    }
    let interrupted = options.interrupted.clone();
    if let Err(error) = ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: stopping after the current measurement, then tearing down");
        interrupted.store(true, Ordering::SeqCst);
    }) {
        eprintln!("warning: cannot install a Ctrl-C handler: {error}");
    }
    match veil_perf::run(&options) {
        Ok(output) => {
            println!("results: {}", output.json.display());
            println!("report:  {}", output.report.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
