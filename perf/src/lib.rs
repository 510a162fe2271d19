//! Veil's benchmark harness.
//!
//! Performance is why Veil exists, so every datapath change is measured the
//! same way: one two-node test bed, every configuration that exists set up
//! side by side (each on its own pod pair), and every measurement run
//! interleaved — A B C A B C… — so machine drift hits all configurations
//! alike. Results are JSON plus a Markdown report with SVG plots, every
//! figure also given as a ratio to the baseline (direct routing).
//!
//! Configurations that do not exist yet are reported as "not built yet",
//! and ones the kernel cannot run as "skipped" with the reason, never faked.

pub mod configs;
pub mod cpu;
mod echo;
pub mod fanout;
pub mod identity;
pub mod iperf;
pub mod machine;
pub mod options;
mod output;
pub mod plan;
pub mod plots;
pub mod report;
pub mod results;
mod runner;
pub mod stats;
mod stunnel;
mod workloads;
mod xdp_pass;

pub use configs::Configuration;
pub use options::{BenchOptions, Workload};
pub use runner::{RunOutput, run};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("benchmarks build network namespaces: run them as root (`sudo -E cargo xtask bench`)")]
    NotRoot,
    #[error(transparent)]
    Testbed(#[from] veil_testbed::TestbedError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{configuration}: {problem}")]
    Configuration {
        configuration: &'static str,
        problem: String,
    },
    #[error("{workload} on {configuration}: {problem}")]
    Measurement {
        workload: &'static str,
        configuration: &'static str,
        problem: String,
    },
    #[error("cannot write the report: {0}")]
    Report(String),
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;

pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let context = context.into();
    move |source| BenchError::Io { context, source }
}
