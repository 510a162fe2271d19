//! The VM's initramfs: busybox, the kernel modules the suites need, and an
//! init that turns this host's filesystem into the VM's root.
//!
//! The host's `/` is shared read-only over 9p and lies under a tmpfs
//! overlay, so the VM runs the very test binaries, `veil-agent`, `ip`,
//! `tcpdump` and libraries this host has, against its own kernel. A second
//! 9p share, the job directory, brings the plan in and the logs out.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

use super::kernels::Kernel;
use crate::shell;

/// Modules the VM loads (their dependencies come with them): the 9p root,
/// the test beds' links and qdiscs, and kernel TLS with its ciphers.
const MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "veth",
    "bridge",
    "vxlan",
    "sch_ingress",
    "cls_bpf",
    "tls",
    "gcm",
    "ghash-generic",
    "ctr",
    "seqiv",
    "aesni-intel",
    "ghash-clmulni-intel",
    "ccm",
    "chacha20poly1305",
    "chacha-x86_64",
    "poly1305-x86_64",
];

/// 9p mount tags (see [`super::boot`]).
pub const ROOT_TAG: &str = "veilroot";
pub const JOB_TAG: &str = "veiljob";
/// Where the job directory appears inside the VM.
pub const JOB_MOUNT: &str = "/mnt/veil-job";
/// The line the VM prints last, with the plan's exit code.
pub const EXIT_MARKER: &str = "VEIL-VM-EXIT ";

/// Builds (or rebuilds) the initramfs for `kernel` under `cache`.
pub fn build(cache: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let dir = cache.join(format!("initramfs-{}", kernel.release));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    for sub in ["bin", "modules"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("busybox-static is not installed (`cargo xtask setup` installs it)")?;
    for (index, module) in module_files(kernel)?.iter().enumerate() {
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("module.ko")
            .trim_end_matches(".xz")
            .trim_end_matches(".zst");
        let target = dir.join("modules").join(format!("{index:03}-{name}"));
        let status = Command::new("sh")
            .arg("-c")
            .arg(r#"case "$1" in *.xz) xz -dc "$1" ;; *.zst) zstd -dc "$1" ;; *) cat "$1" ;; esac > "$2""#)
            .arg("sh")
            .arg(module)
            .arg(&target)
            .status()?;
        ensure!(status.success(), "cannot unpack {}", module.display());
    }
    let init_path = dir.join("init");
    std::fs::write(&init_path, init_script())?;
    shell::run(Command::new("chmod").arg("755").arg(&init_path))?;
    let initrd = cache.join(format!("initrd-{}.cpio.gz", kernel.release));
    shell::run(
        Command::new("sh")
            .current_dir(&dir)
            .arg("-c")
            .arg(r#"find . -print0 | cpio --null --quiet -o -H newc | gzip -1 > "$1""#)
            .arg("sh")
            .arg(&initrd),
    )?;
    std::fs::remove_dir_all(&dir)?;
    Ok(initrd)
}

/// Every module file to load, dependencies first, each once; built-in
/// modules need no file.
fn module_files(kernel: &Kernel) -> Result<Vec<PathBuf>> {
    let mut ordered: Vec<PathBuf> = Vec::new();
    for module in MODULES {
        let deps = shell::output(Command::new("modprobe").arg("-d").arg(&kernel.root).args([
            "-S",
            &kernel.release,
            "--show-depends",
            module,
        ]))
        .with_context(|| {
            format!(
                "modprobe cannot resolve module {module} in {}",
                kernel.root.display()
            )
        })?;
        for line in deps.lines() {
            let Some(path) = line
                .strip_prefix("insmod ")
                .map(|p| p.split_whitespace().next().unwrap_or(p))
            else {
                continue; // "builtin …"
            };
            let path = if Path::new(path).starts_with(&kernel.root) {
                PathBuf::from(path)
            } else {
                kernel.root.join(path.trim_start_matches('/'))
            };
            if !ordered.contains(&path) {
                ordered.push(path);
            }
        }
    }
    Ok(ordered)
}

fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
# Veil's test VM: the host's / (read-only, 9p) under a tmpfs overlay becomes
# the root; the job directory (9p, writable) holds the plan and the logs.
b=/bin/busybox
$b mkdir -p /proc /sys /dev /host /upper /newroot
$b mount -t proc proc /proc
$b mount -t sysfs sys /sys
$b mount -t devtmpfs dev /dev
for m in /modules/*.ko; do $b insmod "$m" || echo "vm: insmod $m failed"; done
$b mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose {ROOT_TAG} /host
$b mount -t tmpfs upper /upper
$b mkdir -p /upper/data /upper/work
$b mount -t overlay root -o lowerdir=/host,upperdir=/upper/data,workdir=/upper/work /newroot
$b mount -t proc proc /newroot/proc
$b mount -t sysfs sys /newroot/sys
$b mount -t devtmpfs dev /newroot/dev
$b mount -t bpf bpf /newroot/sys/fs/bpf
$b mount -t tmpfs tmp /newroot/tmp
$b mount -t tmpfs run /newroot/run
$b mkdir -p /newroot{JOB_MOUNT}
$b mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {JOB_TAG} /newroot{JOB_MOUNT}
$b ip link set lo up
$b chroot /newroot /bin/sh {JOB_MOUNT}/plan.sh
echo "{EXIT_MARKER}$?"
$b poweroff -f
"#
    )
}
