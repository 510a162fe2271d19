//! Workload private keys: made on the node that uses them, kept there.
//!
//! The key is held as PKCS#8 DER in a buffer that is zeroized on drop; the
//! signing key objects built from it for a CSR or a TLS handshake live only as
//! long as that operation. `Debug` never shows key material, and key files are
//! written 0600 (atomically) and refused on load when anyone else could read them.

use std::{
    fmt,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use zeroize::Zeroizing;

use crate::spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot generate a P-256 key: {0}")]
    Generate(rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by others (mode {mode:o}): a private key file must be 0600; fix it with `chmod 600 {path}`"
    )]
    Permissions { path: String, mode: u32 },
    #[error("{path} does not hold a P-256 private key in PKCS#8 PEM: {reason}")]
    Format { path: String, reason: String },
    #[error("cannot build a CSR: {0}")]
    Csr(rcgen::Error),
}

/// A workload's ECDSA P-256 private key.
pub struct WorkloadKey {
    pkcs8_der: Zeroizing<Vec<u8>>,
}

impl WorkloadKey {
    /// A fresh P-256 key.
    pub fn generate() -> Result<Self, KeyError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(KeyError::Generate)?;
        Ok(Self {
            pkcs8_der: Zeroizing::new(key.serialize_der()),
        })
    }

    /// A short-lived signing key object for one operation.
    pub fn key_pair(&self) -> Result<KeyPair, KeyError> {
        KeyPair::try_from(self.pkcs8_der.as_slice()).map_err(KeyError::Generate)
    }

    /// A copy of the key as PKCS#8 DER for the node's own TLS stack; the copy
    /// is zeroized when dropped. Never write it anywhere but [`Self::save`].
    pub fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        self.pkcs8_der.clone()
    }

    /// The key as PKCS#8 PEM (zeroized when dropped), for the opt-in
    /// `kubernetes.io/tls` Secret and [`Self::save`] only.
    pub fn pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        Ok(Zeroizing::new(self.key_pair()?.serialize_pem()))
    }

    /// The public key (SubjectPublicKeyInfo, DER) — safe to share.
    pub fn public_key_der(&self) -> Result<Vec<u8>, KeyError> {
        Ok(rcgen::PublicKeyData::subject_public_key_info(
            &self.key_pair()?,
        ))
    }

    /// A CSR (PEM) asking for `identity` as a URI SAN, signed with this key.
    pub fn csr_pem(&self, identity: &SpiffeId) -> Result<String, KeyError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            identity.to_string().try_into().map_err(KeyError::Csr)?,
        )];
        params
            .serialize_request(&self.key_pair()?)
            .and_then(|csr| csr.pem())
            .map_err(KeyError::Csr)
    }

    /// A CSR (DER) for DNS names, as ACME finalization wants.
    pub fn csr_der_for_names(&self, names: &[String]) -> Result<Vec<u8>, KeyError> {
        let params = CertificateParams::new(names.to_vec()).map_err(KeyError::Csr)?;
        params
            .serialize_request(&self.key_pair()?)
            .map(|csr| csr.der().to_vec())
            .map_err(KeyError::Csr)
    }

    /// Writes the key as PKCS#8 PEM, mode 0600, replacing any file atomically.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let pem = Zeroizing::new(self.key_pair()?.serialize_pem());
        write_atomically(path, pem.as_bytes(), 0o600).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Reads a key written by [`Self::save`]; refuses files others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let display = path.display().to_string();
        let metadata = std::fs::metadata(path).map_err(|source| KeyError::Io {
            path: display.clone(),
            source,
        })?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: display,
                mode,
            });
        }
        let pem = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| KeyError::Io {
                path: display.clone(),
                source,
            })?,
        );
        let key = KeyPair::from_pem(&pem).map_err(|e| KeyError::Format {
            path: display.clone(),
            reason: e.to_string(),
        })?;
        if !key.is_compatible(&PKCS_ECDSA_P256_SHA256) {
            return Err(KeyError::Format {
                path: display,
                reason: "not an ECDSA P-256 key".into(),
            });
        }
        Ok(Self {
            pkcs8_der: Zeroizing::new(key.serialize_der()),
        })
    }
}

/// Writes `bytes` to `path` through a sibling `<name>.partial` file that is
/// created with `mode` (so a private file is never readable by anyone else,
/// not even for a moment), synced, then renamed over `path`: readers see the
/// old content or the new, never a mix.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let Some(name) = path.file_name() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file path",
        ));
    };
    let mut partial_name = name.to_os_string();
    partial_name.push(".partial");
    let partial = path.with_file_name(partial_name);
    // A partial file left by a crash may have any mode: never write into it.
    match std::fs::remove_file(&partial) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&partial)?;
    // The umask may have cleared bits of `mode` (never added any): set it exactly.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&partial, path)?;
    // Make the rename itself durable.
    if let Some(directory) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(directory)?.sync_all()?;
    }
    Ok(())
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkloadKey(ECDSA P-256, private key redacted)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_keys_are_0600_and_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workload.key");
        let key = WorkloadKey::generate().unwrap();
        key.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = WorkloadKey::load(&path).unwrap();
        assert_eq!(
            loaded.public_key_der().unwrap(),
            key.public_key_der().unwrap()
        );
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workload.key");
        WorkloadKey::generate().unwrap().save(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = WorkloadKey::load(&path).unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");
    }

    #[test]
    fn debug_output_never_contains_key_material() {
        let key = WorkloadKey::generate().unwrap();
        let debug = format!("{key:?}");
        assert!(debug.contains("redacted"));
        let pem = key.key_pair().unwrap().serialize_pem();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!debug.contains(&body[..16]));
    }

    #[test]
    fn csr_carries_the_spiffe_id() {
        let key = WorkloadKey::generate().unwrap();
        let id = SpiffeId::new("td", "shop", "cart").unwrap();
        let csr =
            rcgen::CertificateSigningRequestParams::from_pem(&key.csr_pem(&id).unwrap()).unwrap();
        assert!(
            csr.params
                .subject_alt_names
                .iter()
                .any(|san| matches!(san, SanType::URI(uri) if uri.as_str() == id.to_string()))
        );
    }
}
