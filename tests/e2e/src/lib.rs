//! Veil's integration tests live in `tests/`, one file per capability.
//!
//! Each test builds its own network-namespace test bed (`veil-testbed`),
//! runs the real `veil-agent` and `veilctl` binaries in it, sends real
//! traffic and checks what the kernel did. They need root: under `CI=true`
//! they fail without it, elsewhere they print a SKIPPED line.

pub mod mesh_bed;
