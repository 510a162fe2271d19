//! `cargo xtask test`: every check and every test, in the order that fails fastest.

use anyhow::{Context, Result, bail};

use crate::{
    crds, ebpf, kube, paths, setup,
    shell::{self, step},
    vm,
};

pub fn run(cargo_test_args: &[String]) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "`cargo xtask test` runs every test, and most need root (network namespaces, eBPF, \
             qemu): run it as root (`sudo -E cargo xtask test`). Plain `cargo test` runs the \
             unprivileged ones and lists the others as ignored, with what each needs."
        );
    }
    let object = ebpf::build()?;
    let workspace_cargo = || {
        let mut command = shell::cargo();
        command
            .current_dir(paths::repo_root())
            .env("VEIL_EBPF_OBJECT", &object)
            .env("VEIL_BIN_DIR", paths::debug_bin_dir());
        command
    };

    step("Checking the CRD manifests against the Rust types");
    crds::check()?;

    step("Checking formatting (cargo fmt)");
    shell::run(workspace_cargo().args(["fmt", "--all", "--", "--check"]))?;
    shell::run(
        workspace_cargo()
            .current_dir(paths::repo_root().join("ebpf"))
            .args(["fmt", "--", "--check"]),
    )?;

    step("Linting (cargo clippy -D warnings)");
    shell::run(workspace_cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    step("Building the agent and veilctl");
    shell::run(workspace_cargo().args(["build", "--workspace", "--bins"]))?;

    step("Making sure kube-apiserver and etcd are built (for the Kubernetes API tests)");
    let mut tests = workspace_cargo();
    let binaries = kube::ensure_kube_binaries()
        .context("the Kubernetes API tests need kube-apiserver and etcd")?;
    tests
        .env("VEIL_KUBE_APISERVER", &binaries.kube_apiserver)
        .env("VEIL_ETCD", &binaries.etcd);
    step("Making sure pebble is built (for the ACME tests)");
    let pebble = setup::ensure_pebble().context("the ACME tests need pebble")?;
    tests.env("VEIL_PEBBLE", &pebble);
    step("Running unit and integration tests");
    // Tests with a prerequisite (root, a broker, an API server…) are
    // #[ignore]d for plain `cargo test`; here every one runs, and a missing
    // prerequisite fails its test.
    let (cargo_args, test_args) = split_at_separator(cargo_test_args);
    shell::run(
        tests
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(cargo_args)
            .arg("--")
            .arg("--include-ignored")
            .args(test_args),
    )?;
    if cargo_test_args.is_empty() {
        vm::run(&object, &[], &[])?;
    } else {
        println!(
            "note: a filter was given, so the VM suites did not run (`cargo xtask vm-test` runs them)"
        );
    }
    Ok(())
}

/// `cargo xtask test -- ARGS`: what goes to cargo (a test name filter, `-p`)
/// and, after a `--` of its own, what goes to the test binaries.
fn split_at_separator(args: &[String]) -> (&[String], &[String]) {
    match args.iter().position(|a| a == "--") {
        Some(at) => (&args[..at], &args[at + 1..]),
        None => (args, &[]),
    }
}
