//! `cargo xtask test`: every check and every test, in the order that fails fastest.

use anyhow::Result;

use crate::{
    crds, ebpf, ktls_vm, kube, paths, setup,
    shell::{self, step},
};

pub fn run(cargo_test_args: &[String]) -> Result<()> {
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

    if !nix::unistd::Uid::effective().is_root() {
        println!(
            "note: not root — integration tests that need network namespaces will print \
             SKIPPED (under CI=true they fail instead)"
        );
    }
    step("Making sure kube-apiserver and etcd are built (for the Kubernetes API tests)");
    let mut tests = workspace_cargo();
    match kube::ensure_kube_binaries() {
        Ok(binaries) => {
            tests
                .env("VEIL_KUBE_APISERVER", &binaries.kube_apiserver)
                .env("VEIL_ETCD", &binaries.etcd);
        }
        Err(error)
            if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0") =>
        {
            return Err(error.context("CI=true needs kube-apiserver and etcd"));
        }
        Err(error) => println!(
            "note: no kube-apiserver/etcd ({error:#}) — the Kubernetes API tests will print \
             SKIPPED (under CI=true this fails instead)"
        ),
    }
    step("Making sure pebble is built (for the ACME tests)");
    match setup::ensure_pebble() {
        Ok(pebble) => {
            tests.env("VEIL_PEBBLE", &pebble);
        }
        Err(error)
            if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0") =>
        {
            return Err(error.context("CI=true needs pebble"));
        }
        Err(error) => println!(
            "note: no pebble ({error:#}) — the ACME tests will print SKIPPED (under CI=true \
             this fails instead)"
        ),
    }
    step("Running unit and integration tests");
    shell::run(
        tests
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(cargo_test_args),
    )?;
    ktls_vm::run(&object)?;
    Ok(())
}
