//! ACME certificates, their keys and the ACME account on disk.
//!
//! Layout under the store directory:
//!
//! ```text
//! account.json         the ACME account (id, key, directory URL), 0600
//! <name>/tls.key       the certificate's P-256 key, PKCS#8 PEM, 0600
//! <name>/tls.crt       the chain, leaf first, PEM, 0644
//! ```
//!
//! Every file is written to a temporary sibling created with its final mode
//! and renamed into place, so a private file is never readable by others
//! and readers never see half a file. The key is written before the chain;
//! loading checks that they belong together, so a crash between the two
//! renames is noticed (and the certificate obtained again) rather than
//! served. The account is kept because a CA accepts `replaces` only from
//! the account that ordered the certificate being replaced.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use instant_acme::AccountCredentials;
use zeroize::Zeroizing;

use super::CertificateInfo;
use crate::keys::{KeyError, WorkloadKey, write_atomically};

/// The key file in a certificate's directory.
pub const KEY_FILE: &str = "tls.key";
/// The chain file in a certificate's directory.
pub const CHAIN_FILE: &str = "tls.crt";
/// The account file at the store's top.
pub const ACCOUNT_FILE: &str = "account.json";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{path} is not a usable certificate chain: {reason}")]
    Chain { path: PathBuf, reason: String },
    #[error("{key} does not belong to the certificate in {chain}")]
    KeyMismatch { key: PathBuf, chain: PathBuf },
    #[error("{path} is not a readable ACME account: {reason}")]
    Account { path: PathBuf, reason: String },
    #[error(
        "{0:?} cannot name a certificate directory: use 1 to 64 letters, digits, '-', '_' or '.', \
         not starting with '.'"
    )]
    Name(String),
}

/// A certificate as stored, checked: its chain parses and the key is its key.
#[derive(Debug)]
pub struct StoredCertificate {
    pub chain_pem: String,
    pub key: WorkloadKey,
    pub info: CertificateInfo,
}

/// The store directory.
#[derive(Debug, Clone)]
pub struct CertificateStore {
    root: PathBuf,
}

/// Whether `name` can be a directory of the store (no path tricks).
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl CertificateStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<store>/<name>`.
    pub fn directory(&self, name: &str) -> Result<PathBuf, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::Name(name.to_owned()));
        }
        Ok(self.root.join(name))
    }

    /// Replaces the stored key and chain of `name`.
    pub fn save(&self, name: &str, chain_pem: &str, key: &WorkloadKey) -> Result<(), StoreError> {
        let directory = self.directory(name)?;
        create_directory(&directory)?;
        key.save(&directory.join(KEY_FILE))?;
        let chain = directory.join(CHAIN_FILE);
        write_atomically(&chain, chain_pem.as_bytes(), 0o644).map_err(|source| StoreError::Io {
            path: chain,
            source,
        })
    }

    /// The stored certificate of `name`, `None` when nothing is stored.
    /// Refuses a key file others can read, a chain that does not parse and
    /// a key that is not the leaf's.
    pub fn load(&self, name: &str) -> Result<Option<StoredCertificate>, StoreError> {
        let directory = self.directory(name)?;
        let (key_path, chain_path) = (directory.join(KEY_FILE), directory.join(CHAIN_FILE));
        if !key_path.exists() && !chain_path.exists() {
            return Ok(None);
        }
        let key = WorkloadKey::load(&key_path)?;
        let chain_pem = std::fs::read_to_string(&chain_path).map_err(|source| StoreError::Io {
            path: chain_path.clone(),
            source,
        })?;
        let info =
            CertificateInfo::from_chain_pem(&chain_pem).map_err(|reason| StoreError::Chain {
                path: chain_path.clone(),
                reason,
            })?;
        if info.public_key_der != key.public_key_der()? {
            return Err(StoreError::KeyMismatch {
                key: key_path,
                chain: chain_path,
            });
        }
        Ok(Some(StoredCertificate {
            chain_pem,
            key,
            info,
        }))
    }

    /// The stored account for `directory_url`; `None` when there is none or
    /// it belongs to another CA.
    pub fn load_account(
        &self,
        directory_url: &str,
    ) -> Result<Option<AccountCredentials>, StoreError> {
        let path = self.root.join(ACCOUNT_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => Zeroizing::new(text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let account = |reason: String| StoreError::Account {
            path: path.clone(),
            reason,
        };
        let mode = std::fs::metadata(&path)
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(account(format!(
                "readable by others (mode {mode:o}); it holds the account key: `chmod 600 {}`",
                path.display()
            )));
        }
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| account(e.to_string()))?;
        if value.get("directory").and_then(serde_json::Value::as_str) != Some(directory_url) {
            return Ok(None);
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| account(e.to_string()))
    }

    /// Stores the account (0600: it holds the account key).
    pub fn save_account(&self, credentials: &AccountCredentials) -> Result<(), StoreError> {
        let path = self.root.join(ACCOUNT_FILE);
        create_directory(&self.root)?;
        let text = Zeroizing::new(serde_json::to_string(credentials).map_err(|e| {
            StoreError::Account {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?);
        write_atomically(&path, text.as_bytes(), 0o600)
            .map_err(|source| StoreError::Io { path, source })
    }
}

fn create_directory(path: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(path).map_err(|source| StoreError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::certificate::tests::signed_chain;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// A chain and its key as the store holds them.
    fn chain_and_key(names: &[&str]) -> (String, WorkloadKey) {
        let (chain, key) = signed_chain(names);
        let path = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(path.path(), key.serialize_pem()).unwrap();
        std::fs::set_permissions(path.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        (chain, WorkloadKey::load(path.path()).unwrap())
    }

    #[test]
    fn key_and_chain_round_trip_with_their_modes() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertificateStore::new(dir.path().join("acme"));
        assert!(store.load("web").unwrap().is_none(), "nothing stored yet");
        let (chain, key) = chain_and_key(&["web.example"]);
        store.save("web", &chain, &key).unwrap();
        let directory = dir.path().join("acme/web");
        assert_eq!(mode(&directory.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&directory.join(CHAIN_FILE)), 0o644);
        let names: Vec<_> = std::fs::read_dir(&directory)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "no partial files left: {names:?}");
        let loaded = store.load("web").unwrap().unwrap();
        assert_eq!(loaded.chain_pem, chain);
        assert_eq!(loaded.info.dns_names, ["web.example"]);
        assert_eq!(
            loaded.key.public_key_der().unwrap(),
            key.public_key_der().unwrap()
        );
        // Replacing keeps the modes, even over a stale partial file.
        std::fs::write(directory.join("tls.key.partial"), "stale").unwrap();
        std::fs::set_permissions(
            directory.join("tls.key.partial"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let (chain2, key2) = chain_and_key(&["web.example"]);
        store.save("web", &chain2, &key2).unwrap();
        assert_eq!(mode(&directory.join(KEY_FILE)), 0o600);
        assert_eq!(store.load("web").unwrap().unwrap().chain_pem, chain2);
    }

    #[test]
    fn a_key_of_another_certificate_or_a_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertificateStore::new(dir.path());
        let (chain, _) = chain_and_key(&["web.example"]);
        let (_, other_key) = chain_and_key(&["web.example"]);
        store.save("web", &chain, &other_key).unwrap();
        let error = store.load("web").unwrap_err().to_string();
        assert!(error.contains("does not belong"), "{error}");
        let key_path = dir.path().join("web").join(KEY_FILE);
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = store.load("web").unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");
    }

    #[test]
    fn names_cannot_escape_the_store() {
        let store = CertificateStore::new("/tmp/x");
        for bad in ["", "..", "../etc", "a/b", ".hidden", "a b"] {
            assert!(store.directory(bad).is_err(), "{bad:?}");
        }
        assert!(store.directory("shop-ingress_1.v2").is_ok());
    }

    #[test]
    fn the_account_is_private_and_tied_to_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertificateStore::new(dir.path());
        assert!(store.load_account("https://ca/dir").unwrap().is_none());
        let credentials: AccountCredentials = serde_json::from_value(serde_json::json!({
            "id": "https://ca/acct/1",
            "key_pkcs8": "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg",
            "directory": "https://ca/dir",
        }))
        .unwrap();
        store.save_account(&credentials).unwrap();
        assert_eq!(mode(&dir.path().join(ACCOUNT_FILE)), 0o600);
        assert!(store.load_account("https://ca/dir").unwrap().is_some());
        assert!(
            store.load_account("https://other/dir").unwrap().is_none(),
            "another CA's account is not used"
        );
    }
}
