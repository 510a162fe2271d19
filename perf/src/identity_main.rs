//! `veil-identity-bench`: how fast the controller signs CSRs, and how long a
//! new pod waits for its workload certificate (real kube-apiserver, real
//! controller). `cargo xtask bench-identity` builds it in release mode and
//! runs it.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use veil_perf::identity::{self, IdentityOptions};

/// Sign CSRs through the controller's issue path, then create pods on
/// simulated nodes against a real API server and controller and report the
/// pod → certificate-ready latency.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Pods per scenario (each with its own service account).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pods: Option<u32>,
    /// Simulated nodes the pods are spread over.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    nodes: u32,
    /// Pods created per second in the paced scenario (the other is a burst).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=2000))]
    rate: u32,
    /// CSRs signed in the signing part.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    signatures: Option<u32>,
    /// 200 pods and 2,000 signatures (default: 1,000 and 10,000).
    #[arg(long)]
    quick: bool,
    /// Directory for the JSON and the report.
    #[arg(long, default_value = "perf/results")]
    output: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut options = IdentityOptions::new(cli.output, cli.quick);
    if let Some(pods) = cli.pods {
        options.pods = pods as usize;
    }
    if let Some(signatures) = cli.signatures {
        options.signatures = signatures as usize;
    }
    options.nodes = cli.nodes as usize;
    options.rate = cli.rate;
    match identity::run(&options) {
        Ok((results, report)) => {
            print!("{}", identity::markdown(&results));
            println!("\nreport: {}", report.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
