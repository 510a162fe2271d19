//! The kernels of the matrix: Debian's own packages, unpacked in the cache.
//!
//! Each is named by a Debian meta-package and resolved to the current build
//! through apt, so the matrix follows Debian's security updates by itself.
//! Both have the TLS ULP as a module (`CONFIG_TLS=m`), which this host's
//! kernel lacks.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

use crate::shell;

/// One kernel the agent's suites run on.
#[derive(Clone, Copy, Debug)]
pub struct KernelSpec {
    /// What `--kernel` names it.
    pub name: &'static str,
    /// The Debian meta-package that depends on the current build.
    pub meta_package: &'static str,
    pub description: &'static str,
}

/// Debian 12's own kernel (the oldest Veil supports) and Debian's 6.12 LTS.
pub const MATRIX: &[KernelSpec] = &[
    KernelSpec {
        name: "6.1",
        meta_package: "linux-image-amd64",
        description: "Debian 12's kernel",
    },
    KernelSpec {
        name: "6.12",
        meta_package: "linux-image-6.12-amd64",
        description: "Debian's 6.12 LTS kernel for Debian 12",
    },
];

/// A kernel package unpacked in the cache.
pub struct Kernel {
    /// Where the package is unpacked (its `boot/` and `lib/modules/`).
    pub root: PathBuf,
    /// `uname -r` inside the VM.
    pub release: String,
    pub vmlinuz: PathBuf,
}

/// Downloads and unpacks `spec`'s current build once; later runs reuse it.
pub fn ensure(spec: KernelSpec, cache: &Path) -> Result<Kernel> {
    let depends = shell::output(Command::new("apt-cache").args(["depends", spec.meta_package]))
        .with_context(|| format!("cannot ask apt which kernel {} is", spec.meta_package))?;
    let package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
        .map(|rest| format!("linux-image-{rest}"))
        .with_context(|| {
            format!(
                "apt knows no {}: run `apt-get update` (Debian 12's archive has it)",
                spec.meta_package
            )
        })?;
    let release = package.trim_start_matches("linux-image-").to_string();
    let root = cache.join("kernels").join(&package);
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        println!("    downloading {package} ({}; once)", spec.description);
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
        let kernels = cache.join("kernels");
        std::fs::create_dir_all(&kernels)?;
        // Unpacked aside, then moved in place: an interrupted unpack is never taken for a kernel.
        let unpacking = kernels.join(format!("{package}.partial"));
        let _ = std::fs::remove_dir_all(&unpacking);
        shell::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacking))?;
        std::fs::remove_file(&deb)?;
        let _ = std::fs::remove_dir_all(&root);
        std::fs::rename(&unpacking, &root)?;
    }
    if !root
        .join(format!("lib/modules/{release}/modules.dep"))
        .is_file()
    {
        // The package ships no modules.dep.
        shell::run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    }
    ensure!(vmlinuz.is_file(), "{} has no kernel image", root.display());
    Ok(Kernel {
        root,
        release,
        vmlinuz,
    })
}
