//! `cargo xtask`: the one entry point for building, testing and demonstrating Veil.
//!
//! Every command first makes sure the toolchain is there (`setup`), so a fresh
//! Debian 12 machine needs nothing but `cargo xtask demo` or `cargo xtask test`.
//! `install-node`/`uninstall-node` put Veil on a bare host, `deploy` on a cluster.

mod bench;
mod crds;
mod demo;
mod deploy;
mod ebpf;
mod install_node;
mod kube;
mod paths;
mod setup;
mod shell;
mod test;
mod vm;

use std::{path::PathBuf, process::ExitCode};

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
    /// Run the agent's suites on Debian's 6.1 and 6.12 kernels in qemu VMs
    /// (part of `test`): kTLS, programs, counters, overlay, mesh, kernel
    /// fallbacks. Needs root.
    #[command(alias = "ktls-vm")]
    VmTest {
        /// Only this kernel of the matrix (6.1 or 6.12); repeatable.
        #[arg(long = "kernel", value_name = "NAME")]
        kernels: Vec<String>,
        /// Only this suite (mtls-ktls, mtls-session-relay, program-verdicts,
        /// datapath-counters, overlay, mesh, kernel); repeatable.
        #[arg(long = "suite", value_name = "NAME")]
        suites: Vec<String>,
    },
    /// Build kube-apiserver and etcd from their Go modules into
    /// $VEIL_CACHE_DIR/kube (part of `test`; skipped when already built).
    KubeBinaries,
    /// Bring up a two-node test bed with agents, show traffic and counters, tear down.
    Demo,
    /// Benchmark every datapath configuration side by side; writes perf/results/.
    Bench {
        /// Arguments for the harness: --quick, --scenario NAME, --repetitions N, --output DIR
        /// (see `cargo xtask bench -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmark event fan-out: publish → applied on every agent at a fixed
    /// rate through a real broker; writes perf/results/<time>-fanout.md.
    BenchFanout {
        /// Arguments for the benchmark: --quick, --agents N, --rate N, --seconds N
        /// (see `cargo xtask bench-fanout -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmark workload identity issuance: CSRs signed per second by the
    /// controller, and pod → certificate ready at 1,000 pods against a real
    /// kube-apiserver and controller; writes perf/results/<time>-identity.md.
    BenchIdentity {
        /// Arguments for the benchmark: --quick, --pods N, --nodes N, --rate N,
        /// --signatures N (see `cargo xtask bench-identity -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install Veil on this host without Kubernetes: veil-agent and veilctl in
    /// /usr/local/bin, /etc/veil/agent.toml, and the systemd units.
    ///
    /// A manifest (/var/lib/veil/install-manifest.json) records every file and
    /// directory it adds, so `uninstall-node` removes exactly those. Running it
    /// again changes nothing ("unchanged"). On / it runs `systemctl
    /// daemon-reload` and prints the next step; it never starts the agent.
    InstallNode {
        /// Install under this directory instead of / (a scratch root: systemctl
        /// is never called there).
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// The veil-agent binary to install [default: built with `cargo build --release`].
        #[arg(long, value_name = "PATH")]
        agent_binary: Option<PathBuf>,
        /// The veilctl binary to install [default: built with `cargo build --release`].
        #[arg(long, value_name = "PATH")]
        veilctl_binary: Option<PathBuf>,
        /// Agent config (TOML) to install as /etc/veil/agent.toml, checked with
        /// `veil-agent check-config` first [default: a commented example].
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Replace an existing /etc/veil/agent.toml (the old one is backed up,
        /// and uninstall-node puts it back).
        #[arg(long)]
        force_config: bool,
        /// Do not call systemctl, not even daemon-reload.
        #[arg(long)]
        no_start: bool,
    },
    /// Remove what install-node added (per its manifest) and put back what it replaced.
    ///
    /// Files changed since install are kept (and listed) unless --force;
    /// directories go only if install created them and they are empty. On /
    /// it first runs `systemctl disable --now veil-agent`.
    UninstallNode {
        /// The root install-node used.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Also remove files that were changed since install.
        #[arg(long)]
        force: bool,
        /// Do not call systemctl (never called on a scratch root anyway).
        #[arg(long)]
        no_stop: bool,
    },
    /// Render the Kubernetes manifests (CRDs, RBAC, ConfigMaps, agent DaemonSet,
    /// controller Deployment) and apply them with `kubectl apply --server-side`.
    Deploy(deploy::DeployArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(reason) = paths::foreign_binary() {
        eprintln!("error: {reason}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Setup => setup::ensure_toolchain(),
        Command::BuildEbpf => ebpf::build().map(|object| println!("{}", object.display())),
        Command::Test { cargo_test_args } => test::run(&cargo_test_args),
        Command::GenCrds => crds::generate(),
        Command::VmTest { kernels, suites } => {
            ebpf::build().and_then(|object| vm::run(&object, &kernels, &suites))
        }
        Command::KubeBinaries => kube::run(),
        Command::Demo => demo::run(),
        Command::Bench { args } => bench::run(&args),
        Command::BenchFanout { args } => bench::run_fanout(&args),
        Command::BenchIdentity { args } => bench::run_identity(&args),
        Command::InstallNode {
            root,
            agent_binary,
            veilctl_binary,
            config,
            force_config,
            no_start,
        } => install_node::install_cli(install_node::InstallArgs {
            root,
            agent_binary,
            veilctl_binary,
            config,
            force_config,
            no_start,
        }),
        Command::UninstallNode {
            root,
            force,
            no_stop,
        } => install_node::uninstall_cli(&root, force, no_stop),
        Command::Deploy(args) => deploy::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
