//! CRD manifests in deploy/crds/, generated from `veil-crd`'s Rust types.

use anyhow::{Context, Result, bail};

use crate::paths;

fn dir() -> std::path::PathBuf {
    paths::repo_root().join("deploy/crds")
}

/// Writes every manifest.
pub fn generate() -> Result<()> {
    std::fs::create_dir_all(dir())?;
    for (name, yaml) in veil_crd::manifests().context("cannot render the CRDs")? {
        let path = dir().join(name);
        std::fs::write(&path, yaml).with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// Fails when a committed manifest differs from what the types generate.
pub fn check() -> Result<()> {
    let mut stale = Vec::new();
    for (name, yaml) in veil_crd::manifests().context("cannot render the CRDs")? {
        let path = dir().join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
            stale.push(path.display().to_string());
        }
    }
    if !stale.is_empty() {
        bail!(
            "CRD manifests out of date with userspace/crd: {}. Run `cargo xtask gen-crds` and commit the result",
            stale.join(", ")
        );
    }
    Ok(())
}
