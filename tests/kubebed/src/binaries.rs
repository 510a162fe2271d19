//! Finding kube-apiserver and etcd, and failing the test when they are missing.

use std::path::PathBuf;

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

/// The binaries, for the test `what`. Missing: panics (failing the test)
/// with what is missing and how to build it, whether or not `CI` is set: a
/// test that needs a kube-apiserver is `#[ignore]`d, so it runs only when
/// asked for (`cargo xtask test`), and then it must not pass without one.
pub fn require_kube_binaries(what: &str) -> KubeBinaries {
    KubeBinaries::locate()
        .unwrap_or_else(|error| panic!("{what} needs kube-apiserver and etcd: {error}"))
}
