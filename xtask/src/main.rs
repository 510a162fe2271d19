//! `cargo xtask`: the one entry point for building, testing and demonstrating Veil.
//!
//! Every command first makes sure the toolchain is there (`setup`), so a fresh
//! Debian 12 machine needs nothing but `cargo xtask demo` or `cargo xtask test`.

mod bench;
mod crds;
mod demo;
mod ebpf;
mod ktls_vm;
mod paths;
mod setup;
mod shell;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demonstrate Veil")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build needs (apt packages, bpf-linker); idempotent.
    Setup,
    /// Build the eBPF object and print its path.
    BuildEbpf,
    /// Run every check and test: fmt, clippy, unit tests, root integration tests.
    Test {
        /// Extra arguments passed to `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Regenerate the CRD manifests in deploy/crds/ from the Rust types.
    GenCrds,
    /// Run only the kernel-TLS tests, in a qemu VM (part of `test`).
    KtlsVm,
    /// Bring up a two-node test bed with agents, show traffic and counters, tear down.
    Demo,
    /// Benchmark every datapath configuration side by side; writes perf/results/.
    Bench {
        /// Arguments for the harness: --quick, --scenario NAME, --repetitions N, --output DIR
        /// (see `cargo xtask bench -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::ensure_toolchain(),
        Command::BuildEbpf => ebpf::build().map(|object| println!("{}", object.display())),
        Command::Test { cargo_test_args } => test::run(&cargo_test_args),
        Command::GenCrds => crds::generate(),
        Command::KtlsVm => ebpf::build().and_then(|object| ktls_vm::run(&object)),
        Command::Demo => demo::run(),
        Command::Bench { args } => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
