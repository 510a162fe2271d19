//! Veil's integration tests live in `tests/`, one file per capability.
//!
//! Each test builds its own network-namespace test bed (`veil-testbed`),
//! runs the real `veil-agent` and `veilctl` binaries in it, sends real
//! traffic and checks what the kernel did. They need root (and some a Kafka
//! broker, a kube-apiserver or `openssl`), so each is `#[ignore]`d with what
//! it needs: a plain `cargo test` lists them as ignored, `cargo xtask test`
//! runs them (`-- --include-ignored`) as root, and one run without its
//! prerequisite fails, never passes.

pub mod mesh_bed;
