//! Where things are: the repository, cargo's target directory, the eBPF object.

use std::path::PathBuf;

/// The repository root (this crate lives in `xtask/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the repository root")
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (CI keeps it outside
/// the clone so runs share it), else `target/` in the repository.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo_root().join(dir),
        None => repo_root().join("target"),
    }
}

/// Target directory of the eBPF build (its own toolchain, so its own directory).
pub fn ebpf_target_dir() -> PathBuf {
    target_dir().join("ebpf")
}

/// The eBPF object `build-ebpf` produces and the agent embeds.
pub fn ebpf_object() -> PathBuf {
    ebpf_target_dir().join("bpfel-unknown-none/release/veil-ebpf")
}

/// Where the workspace's debug binaries land.
pub fn debug_bin_dir() -> PathBuf {
    target_dir().join("debug")
}

/// Downloads and other slow-to-make artefacts (kernels, initramfs): under
/// `VEIL_CACHE_DIR` when set (CI keeps it outside the clone), else in the target dir.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("VEIL_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => target_dir().join("veil-cache"),
    }
}
