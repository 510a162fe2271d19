//! A real kube-apiserver and etcd for the Kubernetes API tests, built from
//! their Go modules and cached outside the clone.
//!
//! No Debian package ships kube-apiserver, so it is built from source: a
//! scratch Go module requires `k8s.io/kubernetes` and replaces each of its
//! staging modules (the `./staging/src/k8s.io/…` entries of Kubernetes' own
//! go.mod) with the published `v0.<minor>.<patch>` release, the usual way of
//! importing k8s.io/kubernetes; then `go build k8s.io/kubernetes/cmd/kube-apiserver`.
//! etcd is built the same way from `go.etcd.io/etcd/server/v3` (the release
//! kubeadm pairs with this Kubernetes minor).
//!
//! Everything lives under `$VEIL_CACHE_DIR/kube` (binaries in `bin/`, the
//! scratch modules in `src/`) and `$VEIL_CACHE_DIR/go` (module download and
//! build caches), `VEIL_CACHE_DIR` defaulting to `/var/cache/veil`. A stamp
//! file next to each binary names the version it was built from, so bumping a
//! version below rebuilds it and nothing else does.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::shell::{self, step};

/// The Kubernetes release kube-apiserver is built from.
pub const KUBERNETES_VERSION: &str = "v1.34.4";
/// The etcd release (kubeadm's default for Kubernetes 1.34).
pub const ETCD_VERSION: &str = "v3.6.5";
/// The oldest Go that builds both (k8s.io/kubernetes v1.34's go.mod says `go 1.24.0`),
/// and pebble (see `setup::ensure_pebble`; its go.mod says the same).
const MINIMUM_GO: (u32, u32) = (1, 24);

/// Where the two binaries are, and what they say their versions are.
#[derive(Debug, Clone)]
pub struct KubeBinaries {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
    pub kube_apiserver_version: String,
    pub etcd_version: String,
}

/// `$VEIL_CACHE_DIR/kube`, `VEIL_CACHE_DIR` defaulting to `/var/cache/veil`
/// (the tests look there too: see `tests/kubebed`).
pub fn kube_cache_dir() -> PathBuf {
    cache_root().join("kube")
}

/// `$VEIL_CACHE_DIR`, defaulting to `/var/cache/veil`.
pub(crate) fn cache_root() -> PathBuf {
    std::env::var_os("VEIL_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/veil"))
}

/// Builds kube-apiserver and etcd unless the cached ones are of the wanted
/// versions; idempotent, and fast when there is nothing to do.
pub fn ensure_kube_binaries() -> Result<KubeBinaries> {
    let bin_dir = kube_cache_dir().join("bin");
    let kube_apiserver = bin_dir.join("kube-apiserver");
    let etcd = bin_dir.join("etcd");
    let apiserver_current = is_current(&kube_apiserver, KUBERNETES_VERSION);
    let etcd_current = is_current(&etcd, ETCD_VERSION);
    if !apiserver_current || !etcd_current {
        fs::create_dir_all(&bin_dir).with_context(|| {
            format!(
                "cannot create {}: set VEIL_CACHE_DIR to a writable directory outside the clone \
                 (or run as root to use /var/cache/veil)",
                bin_dir.display()
            )
        })?;
        let go = Go::find("kube-apiserver and etcd")?;
        if !apiserver_current {
            build_kube_apiserver(&go, &kube_apiserver)?;
        }
        if !etcd_current {
            build_etcd(&go, &etcd)?;
        }
    }
    let binaries = KubeBinaries {
        kube_apiserver_version: version_of(&kube_apiserver, "--version")?,
        etcd_version: version_of(&etcd, "--version")?,
        kube_apiserver,
        etcd,
    };
    println!(
        "kube-apiserver: {} ({})\netcd: {} ({})",
        binaries.kube_apiserver.display(),
        binaries.kube_apiserver_version,
        binaries.etcd.display(),
        binaries.etcd_version
    );
    Ok(binaries)
}

/// `cargo xtask kube-binaries`.
pub fn run() -> Result<()> {
    ensure_kube_binaries().map(|_| ())
}

/// The stamp written next to `binary` once it is built from `version`.
pub(crate) fn stamp_path(binary: &Path) -> PathBuf {
    binary.with_extension("version")
}

/// Whether `binary` exists and its stamp names `version`.
pub(crate) fn is_current(binary: &Path, version: &str) -> bool {
    binary.is_file()
        && fs::read_to_string(stamp_path(binary)).is_ok_and(|stamp| stamp.trim() == version)
}

/// The first line `binary <flag>` prints, e.g. `Kubernetes v1.34.4`.
fn version_of(binary: &Path, flag: &str) -> Result<String> {
    let output = shell::output(Command::new(binary).arg(flag)).with_context(|| {
        format!(
            "`{} {flag}` fails: remove {} and run `cargo xtask kube-binaries` to rebuild it",
            binary.display(),
            binary.display()
        )
    })?;
    Ok(output.lines().next().unwrap_or_default().trim().to_owned())
}

/// The Go toolchain, with every cache pointed under `$VEIL_CACHE_DIR/go`.
pub(crate) struct Go {
    program: PathBuf,
    cache: PathBuf,
}

impl Go {
    /// `go` from PATH, else /usr/local/go/bin/go (where go.dev's tarball goes);
    /// refuses one older than [`MINIMUM_GO`]. `what` names what is to be
    /// built, for the error messages.
    pub(crate) fn find(what: &str) -> Result<Self> {
        let candidates = [PathBuf::from("go"), PathBuf::from("/usr/local/go/bin/go")];
        let how_to_install = format!(
            "install Go {}.{} or later (https://go.dev/dl/, e.g. unpacked into /usr/local/go); \
             Debian 12's golang package is too old",
            MINIMUM_GO.0, MINIMUM_GO.1
        );
        let Some((program, version)) = candidates.into_iter().find_map(|program| {
            shell::output(Command::new(&program).args(["env", "GOVERSION"]))
                .map(|version| (program, version.trim().to_owned()))
        }) else {
            bail!("building {what} needs Go, which is not installed: {how_to_install}");
        };
        let (major, minor) = parse_go_version(&version)
            .with_context(|| format!("cannot read the Go version {version:?}"))?;
        if (major, minor) < MINIMUM_GO {
            bail!(
                "{} is {version}, too old to build {what}: {how_to_install}",
                program.display()
            );
        }
        Ok(Self {
            program,
            cache: cache_root().join("go"),
        })
    }

    /// `go <args>` in `dir`, offline from anything but the module proxy, with
    /// no cgo (static binaries) and no automatic toolchain download.
    fn command(&self, dir: &Path) -> Command {
        let mut command = Command::new(&self.program);
        command
            .current_dir(dir)
            .env("GOPATH", self.cache.join("path"))
            .env("GOMODCACHE", self.cache.join("modcache"))
            .env("GOCACHE", self.cache.join("cache"))
            .env("GOFLAGS", "-mod=mod")
            .env("GO111MODULE", "on")
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0");
        command
    }

    /// The go.mod of `module@version`, downloaded into the module cache.
    fn download_go_mod(&self, dir: &Path, module: &str, version: &str) -> Result<String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Download {
            go_mod: Option<PathBuf>,
            error: Option<String>,
        }
        let started = Instant::now();
        let output = self
            .command(dir)
            .args(["mod", "download", "-json"])
            .arg(format!("{module}@{version}"))
            .output()
            .context("cannot run `go mod download`")?;
        let download: Download = serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "`go mod download {module}@{version}` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )
        })?;
        if let Some(error) = download.error {
            bail!(
                "cannot download {module}@{version}: {error} (is the Go module proxy reachable? \
                 see `go env GOPROXY`)"
            );
        }
        let path = download
            .go_mod
            .with_context(|| format!("`go mod download` names no go.mod for {module}"))?;
        println!("downloaded {module}@{version} in {:.1?}", started.elapsed());
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    }

    /// Writes the scratch module into `dir` and resolves its requirements.
    fn prepare_module(&self, dir: &Path, go_mod: &str, anchor_package: &str) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        fs::write(dir.join("go.mod"), go_mod)?;
        // A build-tagged import, so `go mod tidy` records every module the
        // binary needs (a main package itself cannot be imported).
        fs::write(
            dir.join("tools.go"),
            format!("//go:build tools\n\npackage tools\n\nimport _ \"{anchor_package}\"\n"),
        )?;
        let started = Instant::now();
        shell::run(self.command(dir).args(["mod", "tidy"]))
            .context("resolving the Go modules failed: is the Go module proxy reachable?")?;
        println!("resolved the modules in {:.1?}", started.elapsed());
        Ok(())
    }

    /// `go build -o <output> <package>`, into a temporary name first so a
    /// failed or interrupted build never leaves a binary that looks current.
    fn build(&self, dir: &Path, package: &str, ldflags: &str, output: &Path) -> Result<()> {
        let partial = output.with_extension("partial");
        let started = Instant::now();
        shell::run(
            self.command(dir)
                .args(["build", "-trimpath", "-ldflags", ldflags, "-o"])
                .arg(&partial)
                .arg(package),
        )
        .with_context(|| format!("building {package} failed (its errors are above)"))?;
        fs::rename(&partial, output)?;
        println!("built {} in {:.0?}", output.display(), started.elapsed());
        Ok(())
    }
}

impl Go {
    /// `go install <package>@<version>` (the module's own go.mod and go.sum
    /// pin every dependency) into `output`, through a scratch `GOBIN` so a
    /// failed build never leaves a binary that looks current.
    pub(crate) fn install(&self, package: &str, version: &str, output: &Path) -> Result<()> {
        let gobin = output.with_extension("gobin");
        let _ = fs::remove_dir_all(&gobin);
        fs::create_dir_all(&gobin).with_context(|| format!("cannot create {}", gobin.display()))?;
        let started = Instant::now();
        shell::run(
            self.command(&gobin)
                .env("GOBIN", &gobin)
                .args(["install", "-trimpath", "-ldflags", "-s -w"])
                .arg(format!("{package}@{version}")),
        )
        .with_context(|| {
            format!("building {package}@{version} failed: is the Go module proxy reachable?")
        })?;
        let name = package.rsplit('/').next().unwrap_or(package);
        fs::rename(gobin.join(name), output)
            .with_context(|| format!("`go install` made no {name} in {}", gobin.display()))?;
        let _ = fs::remove_dir_all(&gobin);
        println!("built {} in {:.0?}", output.display(), started.elapsed());
        Ok(())
    }
}

/// `go1.26.8` or `go1.24.0` or `go1.25rc1` → (1, 26).
fn parse_go_version(version: &str) -> Option<(u32, u32)> {
    let rest = version.strip_prefix("go")?;
    let mut parts = rest.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

fn build_kube_apiserver(go: &Go, output: &Path) -> Result<()> {
    let dir = kube_cache_dir()
        .join("src")
        .join(format!("kubernetes-{KUBERNETES_VERSION}"));
    step(&format!(
        "Building kube-apiserver {KUBERNETES_VERSION} from k8s.io/kubernetes (the first build \
         takes 10-40 minutes; cached in {})",
        kube_cache_dir().display()
    ));
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let kubernetes_go_mod = go.download_go_mod(&dir, "k8s.io/kubernetes", KUBERNETES_VERSION)?;
    let staging = staging_modules(&kubernetes_go_mod);
    if staging.is_empty() {
        bail!(
            "k8s.io/kubernetes {KUBERNETES_VERSION}'s go.mod replaces no module with \
             ./staging/src/…: its layout changed, adapt xtask/src/kube.rs"
        );
    }
    let go_mod = scratch_go_mod(KUBERNETES_VERSION, &staging)?;
    go.prepare_module(&dir, &go_mod, "k8s.io/kubernetes/cmd/kube-apiserver/app")?;
    let minor = KUBERNETES_VERSION
        .trim_start_matches('v')
        .split('.')
        .nth(1)
        .unwrap_or_default();
    // What `kube-apiserver --version` reports and /version serves (the
    // Kubernetes build scripts set these the same way).
    let ldflags = format!(
        "-s -w -X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION} \
         -X k8s.io/component-base/version.gitMajor=1 \
         -X k8s.io/component-base/version.gitMinor={minor} \
         -X k8s.io/component-base/version.gitTreeState=clean"
    );
    go.build(
        &dir,
        "k8s.io/kubernetes/cmd/kube-apiserver",
        &ldflags,
        output,
    )?;
    fs::write(stamp_path(output), format!("{KUBERNETES_VERSION}\n"))?;
    Ok(())
}

fn build_etcd(go: &Go, output: &Path) -> Result<()> {
    let dir = kube_cache_dir()
        .join("src")
        .join(format!("etcd-{ETCD_VERSION}"));
    step(&format!(
        "Building etcd {ETCD_VERSION} from go.etcd.io/etcd/server/v3 (a few minutes the first time)"
    ));
    let go_mod = format!(
        "module veil.local/etcd-build\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 {ETCD_VERSION}\n"
    );
    go.prepare_module(&dir, &go_mod, "go.etcd.io/etcd/server/v3/etcdmain")?;
    go.build(&dir, "go.etcd.io/etcd/server/v3", "-s -w", output)?;
    fs::write(stamp_path(output), format!("{ETCD_VERSION}\n"))?;
    Ok(())
}

/// The modules Kubernetes' go.mod replaces with `./staging/src/…` directories.
fn staging_modules(go_mod: &str) -> Vec<String> {
    go_mod
        .lines()
        .filter_map(|line| {
            let (module, target) = line
                .trim()
                .trim_start_matches("replace ")
                .split_once("=>")?;
            target
                .trim()
                .starts_with("./staging/")
                .then(|| module.trim().to_owned())
        })
        .collect()
}

/// go.mod of the scratch module: k8s.io/kubernetes plus each staging module
/// at its published release (`v1.34.4` → `v0.34.4`).
fn scratch_go_mod(kubernetes: &str, staging: &[String]) -> Result<String> {
    let Some(rest) = kubernetes.strip_prefix("v1.") else {
        bail!("unexpected Kubernetes version {kubernetes}: expected v1.<minor>.<patch>");
    };
    let staging_version = format!("v0.{rest}");
    let mut go_mod = format!(
        "module veil.local/kube-apiserver-build\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes {kubernetes}\n\nreplace (\n"
    );
    for module in staging {
        go_mod.push_str(&format!("\t{module} => {module} {staging_version}\n"));
    }
    go_mod.push_str(")\n");
    Ok(go_mod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_modules_are_read_from_the_replace_block() {
        let go_mod = "module k8s.io/kubernetes\n\nrequire (\n\tk8s.io/api v0.0.0\n)\n\n\
                      replace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\
                      \tk8s.io/kms => ./staging/src/k8s.io/kms\n\
                      \tgithub.com/x/y => github.com/x/z v1.0.0\n)\n\
                      replace k8s.io/kubectl => ./staging/src/k8s.io/kubectl\n";
        assert_eq!(
            staging_modules(go_mod),
            ["k8s.io/api", "k8s.io/kms", "k8s.io/kubectl"]
        );
    }

    #[test]
    fn each_staging_module_is_pinned_to_the_matching_v0_release() {
        let go_mod = scratch_go_mod("v1.34.4", &["k8s.io/api".into()]).unwrap();
        assert!(
            go_mod.contains("require k8s.io/kubernetes v1.34.4\n"),
            "{go_mod}"
        );
        assert!(
            go_mod.contains("\tk8s.io/api => k8s.io/api v0.34.4\n"),
            "{go_mod}"
        );
        assert!(scratch_go_mod("1.34.4", &[]).is_err());
    }

    #[test]
    fn go_versions_are_parsed() {
        assert_eq!(parse_go_version("go1.26.8"), Some((1, 26)));
        assert_eq!(parse_go_version("go1.24rc1"), Some((1, 24)));
        assert_eq!(parse_go_version("devel"), None);
    }
}
