//! Network-namespace test beds for Veil.
//!
//! Integration tests, the demo and the benchmarks all need the same thing: a
//! few "nodes" joined by an underlay, each with a few "pods", on one machine.
//! [`Topology`] builds that from network namespaces and veth pairs, with
//! addresses only from 198.18.0.0/15 (the range reserved for benchmarking),
//! and tears it down on drop — also when a test panics. It refuses to reuse a
//! stale topology of its own name: it cleans it away first.
//!
//! Layout of a topology named `t` (see [`addressing`] for the numbers):
//!
//! ```text
//!  netns veil-t-ul:  br0 ── u1 ── u2 ── …          (the underlay switch)
//!                          │     │
//!  netns veil-t-n1:   ul0 198.18.0.1/24     netns veil-t-n2: ul0 198.18.0.2/24
//!                     vp1 ─┐ vp2 ─┐ (198.19.1.254 on each: the pods' gateway)
//!  netns veil-t-n1p1:  eth0 198.19.1.1/32   netns veil-t-n1p2: eth0 198.19.1.2/32
//! ```
//!
//! Building a topology needs root. Tests that do are
//! `#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]`
//! and start with [`require_root`], which fails the test when it runs
//! without root anyway; [`prerequisites`] has that rule, the other checks and
//! the one CI predicate, [`running_in_ci`].

pub mod addressing;
pub mod agents;
pub mod binaries;
mod command;
pub mod inventory;
pub mod kafka;
pub mod mesh_ca;
pub mod netns;
pub mod prerequisites;
pub mod process;
pub mod relay;
pub mod routes;
pub mod topology;
pub mod traffic;
pub mod waiting;

pub use addressing::PodRef;
pub use agents::Agent;
pub use mesh_ca::MeshCaFiles;
pub use prerequisites::{require_program, require_root, running_in_ci};
pub use topology::{PodMesh, Routing, Topology, TopologySpec};
pub use waiting::{try_wait_for, wait_for};

/// Everything that can go wrong while building or using a test bed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`: {source} (is it installed? `cargo xtask setup` installs it)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("invalid test bed: {0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Agent(String),
    #[error("traffic check failed: {0}")]
    Traffic(String),
}

pub type Result<T, E = TestbedError> = std::result::Result<T, E>;

pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestbedError {
    let context = context.into();
    move |source| TestbedError::Io { context, source }
}
