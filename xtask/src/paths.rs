//! Where things are: the repository, cargo's target directory, the eBPF object.

use std::path::PathBuf;

/// The repository root (this crate lives in `xtask/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the repository root")
        .to_path_buf()
}

/// When `cargo xtask` runs an xtask binary built from another checkout
/// (two checkouts sharing one `CARGO_TARGET_DIR`: cargo does not copy a
/// fresh binary over one the other checkout built), the reason to refuse:
/// that binary would work on the other checkout.
pub fn foreign_binary() -> Option<String> {
    // Only `cargo run -p xtask` (and xtask's own tests) say which package
    // they run for; other processes may pass their own manifest on.
    if std::env::var_os("CARGO_PKG_NAME").is_none_or(|name| name != "xtask") {
        return None;
    }
    let running_for = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let built_for = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (running_for, built_for) = (
        std::fs::canonicalize(&running_for).unwrap_or_else(|_| running_for.into()),
        std::fs::canonicalize(&built_for).unwrap_or(built_for),
    );
    (running_for != built_for).then(|| {
        format!(
            "this xtask binary was built from {} but runs for {} (the two share a cargo \
             target directory); run `touch {}/src/main.rs` and the command again",
            built_for.display(),
            running_for.display(),
            running_for.display()
        )
    })
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
