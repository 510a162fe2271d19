//! Finds the eBPF object built by `cargo xtask build-ebpf` so the agent can embed it.

use std::{env, path::PathBuf, process::exit};

fn main() {
    println!("cargo:rerun-if-env-changed=VEIL_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let object = match env::var_os("VEIL_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => default_target_dir().join("ebpf/bpfel-unknown-none/release/veil-ebpf"),
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        eprintln!(
            "error: the eBPF object is missing at {}\n\
             Run `cargo xtask build-ebpf` first (it prints the object's path), \
             or set VEIL_EBPF_OBJECT to an object built elsewhere.",
            object.display()
        );
        exit(1);
    }
    println!("cargo:rustc-env=VEIL_EBPF_OBJECT={}", object.display());
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set, else the workspace's `target/`.
fn default_target_dir() -> PathBuf {
    let workspace =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("../..");
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}
