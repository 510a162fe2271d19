//! The mesh's root CA in a test bed's scratch directory, and the agents'
//! `[mesh]` section that points at it: one place for both, whoever makes
//! the PEM (the tests and benchmarks with veil-identity, the demo with
//! openssl).

use std::{os::unix::fs::PermissionsExt, path::PathBuf};

use crate::{Result, io_error, topology::Topology};

/// Where a test bed keeps the mesh root's certificate and key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshCaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl MeshCaFiles {
    /// The paths in `topology`'s scratch directory (nothing is written).
    pub fn in_workdir(topology: &Topology) -> Self {
        Self {
            cert: topology.workdir().join("mesh-root.pem"),
            key: topology.workdir().join("mesh-root.key"),
        }
    }

    /// Writes `cert_pem` and `key_pem` there; the key gets mode 0600.
    pub fn write(topology: &Topology, cert_pem: &str, key_pem: &str) -> Result<Self> {
        let files = Self::in_workdir(topology);
        std::fs::write(&files.cert, cert_pem)
            .map_err(io_error(format!("cannot write {}", files.cert.display())))?;
        std::fs::write(&files.key, key_pem)
            .map_err(io_error(format!("cannot write {}", files.key.display())))?;
        files.restrict_key()?;
        Ok(files)
    }

    /// Gives the key mode 0600 (the agent refuses anything looser).
    pub fn restrict_key(&self) -> Result<()> {
        std::fs::set_permissions(&self.key, std::fs::Permissions::from_mode(0o600)).map_err(
            io_error(format!("cannot restrict {} to 0600", self.key.display())),
        )
    }

    /// The agents' `[mesh]` section: this root, the agent signing with it.
    pub fn agent_section(&self, trust_domain: &str) -> String {
        format!(
            "\n[mesh]\ntrust_domain = \"{trust_domain}\"\nca_cert = \"{}\"\nca_key = \"{}\"\n",
            self.cert.display(),
            self.key.display()
        )
    }
}
