//! The kernel-TLS tests, in a qemu VM.
//!
//! This host's kernel has no TLS ULP (and cannot load modules), so the kTLS
//! tests (`userspace/mtls/tests/ktls_vm.rs`, `#[ignore]`d on the host) run
//! inside a VM: Debian's own kernel (built with CONFIG_TLS=m) under qemu's
//! TCG emulation, an initramfs with busybox, the crypto and tls modules and
//! the tests as a static binary. The VM prints the tests' output and a marker
//! with their exit code, then powers off. Everything downloaded or built is
//! kept in the cache directory, so reruns only rebuild the test binary.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    paths,
    shell::{self, step},
};

/// Modules the tests need (their dependencies are added by modprobe).
const MODULES: &[&str] = &[
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
const EXIT_MARKER: &str = "VEIL-VM-EXIT ";
/// Test targets of veil-mtls run in the VM, with their arguments: the kTLS
/// tests (ignored on hosts without TLS) and the session relay, which must
/// pick the kernel there.
const TEST_TARGETS: &[(&str, &str)] = &[
    ("ktls_vm", "--ignored --test-threads=1 --nocapture"),
    ("session_relay", "--test-threads=1 --nocapture"),
];
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A Debian kernel package unpacked in the cache.
struct Kernel {
    root: PathBuf,
    version: String,
    vmlinuz: PathBuf,
}

pub fn run(ebpf_object: &Path) -> Result<()> {
    step("Kernel TLS tests in a qemu VM (Debian's kernel with tls.ko; this host has no kTLS)");
    let cache = paths::cache_dir().join("ktls-vm");
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create {}", cache.display()))?;
    let kernel = ensure_kernel(&cache)?;
    let test_binaries = build_static_tests(ebpf_object)?;
    let initrd = build_initramfs(&cache, &kernel, &test_binaries)?;
    boot(&kernel.vmlinuz, &initrd)
}

fn ensure_kernel(cache: &Path) -> Result<Kernel> {
    let depends = shell::output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))
        .context("cannot ask apt which kernel linux-image-amd64 is")?;
    let package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
        .map(|rest| format!("linux-image-{rest}"))
        .context("apt knows no linux-image-amd64: run `apt-get update`")?;
    let version = package.trim_start_matches("linux-image-").to_string();
    let root = cache.join(&package);
    let vmlinuz = root.join(format!("boot/vmlinuz-{version}"));
    if !vmlinuz.is_file() {
        println!("    downloading {package} (once)");
        let download = cache.join("download");
        std::fs::create_dir_all(&download)?;
        shell::run(
            Command::new("apt-get")
                .current_dir(&download)
                .args(["download", &package]),
        )?;
        let deb = std::fs::read_dir(&download)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.extension().is_some_and(|x| x == "deb") && p.to_string_lossy().contains(&package)
            })
            .context("apt-get download produced no .deb")?;
        shell::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
        std::fs::remove_file(&deb)?;
    }
    if !root
        .join(format!("lib/modules/{version}/modules.dep"))
        .is_file()
    {
        // The package ships no modules.dep.
        shell::run(Command::new("depmod").arg("-b").arg(&root).arg(&version))?;
    }
    Ok(Kernel {
        root,
        version,
        vmlinuz,
    })
}

/// Builds the VM's test targets as static binaries: (target name, path).
fn build_static_tests(ebpf_object: &Path) -> Result<Vec<(String, PathBuf)>> {
    println!("    building the kTLS tests as a static binary");
    let output = shell::cargo()
        .current_dir(paths::repo_root())
        .env("VEIL_EBPF_OBJECT", ebpf_object)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "test",
            "--no-run",
            "--quiet",
            "--message-format=json",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-p",
            "veil-mtls",
        ])
        .args(TEST_TARGETS.iter().flat_map(|(name, _)| ["--test", name]))
        .output()
        .context("cannot run cargo")?;
    ensure!(
        output.status.success(),
        "building the static kTLS tests failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let messages: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    TEST_TARGETS
        .iter()
        .map(|(name, _)| {
            messages
                .iter()
                .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == *name)
                .find_map(|m| m["executable"].as_str().map(PathBuf::from))
                .map(|path| (name.to_string(), path))
                .with_context(|| format!("cargo built no {name} test executable"))
        })
        .collect()
}

fn build_initramfs(cache: &Path, kernel: &Kernel, tests: &[(String, PathBuf)]) -> Result<PathBuf> {
    let dir = cache.join("initramfs");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    for sub in ["bin", "modules"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("busybox-static is not installed")?;
    for (name, path) in tests {
        std::fs::copy(path, dir.join(format!("test-{name}")))?;
    }

    let mut ordered: Vec<PathBuf> = Vec::new();
    for module in MODULES {
        let deps = shell::output(Command::new("modprobe").arg("-d").arg(&kernel.root).args([
            "-S",
            &kernel.version,
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
    for (index, module) in ordered.iter().enumerate() {
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("module.ko")
            .trim_end_matches(".xz")
            .trim_end_matches(".zst");
        let target = dir.join("modules").join(format!("{index:02}-{name}"));
        let status = Command::new("sh")
            .arg("-c")
            .arg(r#"case "$1" in *.xz) xz -dc "$1" ;; *) cat "$1" ;; esac > "$2""#)
            .arg("sh")
            .arg(module)
            .arg(&target)
            .status()?;
        ensure!(status.success(), "cannot unpack {}", module.display());
    }
    let init = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in /modules/*.ko; do /bin/busybox insmod "$m" 2>/dev/null; done
/bin/busybox ip link set lo up
status=0
{TESTS}
echo "VEIL-VM-EXIT $status"
/bin/busybox poweroff -f
"#;
    let runs: String = TEST_TARGETS
        .iter()
        .map(|(name, args)| format!("/test-{name} {args} || status=1\n"))
        .collect();
    let init = init.replace("{TESTS}\n", &runs);
    let init_path = dir.join("init");
    std::fs::write(&init_path, &init)?;
    shell::run(Command::new("chmod").arg("755").arg(&init_path))?;
    let initrd = cache.join("initrd.cpio.gz");
    shell::run(
        Command::new("sh")
            .current_dir(&dir)
            .arg("-c")
            .arg(r#"find . -print0 | cpio --null --quiet -o -H newc | gzip -1 > "$1""#)
            .arg("sh")
            .arg(&initrd),
    )?;
    Ok(initrd)
}

fn boot(vmlinuz: &Path, initrd: &Path) -> Result<()> {
    println!("    booting the VM (qemu TCG, a minute or two)");
    let output = Command::new("timeout")
        .arg(BOOT_TIMEOUT.as_secs().to_string())
        .args([
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "1024",
        ])
        .args([
            "-bios",
            "/usr/share/qemu/qboot.rom",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .output()
        .context("cannot start qemu-system-x86_64")?;
    let console = String::from_utf8_lossy(&output.stdout);
    for line in console.lines() {
        println!("    vm| {}", line.trim_end_matches('\r'));
    }
    let Some(code) = console
        .lines()
        .find_map(|l| l.trim().strip_prefix(EXIT_MARKER))
        .and_then(|c| c.trim().parse::<i32>().ok())
    else {
        bail!(
            "the VM ended without running the kTLS tests (no `{EXIT_MARKER}` line; qemu {}): see the console above",
            output.status
        );
    };
    ensure!(
        code == 0,
        "the kTLS tests failed inside the VM (exit {code})"
    );
    Ok(())
}
