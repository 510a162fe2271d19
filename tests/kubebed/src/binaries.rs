//! Finding kube-apiserver and etcd, and the skip-or-fail rule when they are missing.

use std::{io::Write, path::PathBuf};

use crate::{KubeBedError, Result};

/// The command that builds the binaries (and says where they go).
pub const BUILD_COMMAND: &str = "cargo xtask kube-binaries";

/// The kube-apiserver and etcd executables a [`crate::KubeApi`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeBinaries {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
}

impl KubeBinaries {
    /// `VEIL_KUBE_APISERVER` and `VEIL_ETCD` when set (`cargo xtask test`
    /// sets them), else `$VEIL_CACHE_DIR/kube/bin/{kube-apiserver,etcd}`
    /// with `VEIL_CACHE_DIR` defaulting to `/var/cache/veil`, where
    /// `cargo xtask kube-binaries` builds them.
    pub fn locate() -> Result<Self> {
        let bin_dir = std::env::var_os("VEIL_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/veil"))
            .join("kube/bin");
        let pick = |variable: &str, name: &str| {
            std::env::var_os(variable)
                .map(PathBuf::from)
                .unwrap_or_else(|| bin_dir.join(name))
        };
        let binaries = Self {
            kube_apiserver: pick("VEIL_KUBE_APISERVER", "kube-apiserver"),
            etcd: pick("VEIL_ETCD", "etcd"),
        };
        let missing: Vec<String> = [&binaries.kube_apiserver, &binaries.etcd]
            .into_iter()
            .filter(|path| !path.is_file())
            .map(|path| path.display().to_string())
            .collect();
        if !missing.is_empty() {
            return Err(KubeBedError::BinariesMissing {
                missing: missing.join(", "),
            });
        }
        Ok(binaries)
    }
}

/// The binaries when they are there. Missing under `CI=true`: panics (a CI
/// run that skipped the API server tests would prove nothing). Missing
/// elsewhere: prints a visible `SKIPPED:` line to stderr (past the test
/// harness's capture) and returns `None`, and the caller returns.
pub fn require_kube_binaries(what: &str) -> Option<KubeBinaries> {
    match KubeBinaries::locate() {
        Ok(binaries) => Some(binaries),
        Err(error) if running_in_ci() => {
            panic!("{what} needs a kube-apiserver, and CI=true forbids skipping it: {error}")
        }
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "SKIPPED: {what}: {error}");
            None
        }
    }
}

/// `CI` set to anything but empty, `false` or `0`.
pub(crate) fn running_in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}
