//! Revoked workload certificates and identities, learnt from the event bus.
//!
//! `certificate-revoked` events on `veil.certificates` name a serial (and
//! the identity it was issued to); `identity-revoked` events name a SPIFFE
//! ID and an instant, refusing every certificate of it issued before. Every
//! agent adds them to what its mTLS verifiers refuse, at once, for new
//! handshakes; an agent holding such a certificate itself throws its key away
//! and has a new one issued. The list survives restarts in the event cache
//! directory (`revoked-serials.json`, 0600), written before the offsets that
//! carried it are committed.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{OnceLock, RwLock},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// One revocation, as handed to the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// One certificate: `(serial, identity)`.
    Serial { serial: String, identity: String },
    /// Every certificate of `identity` issued before `before` (unix seconds).
    Identity { identity: String, before: u64 },
}

/// Called once for each new revocation (or later identity instant).
pub type RevocationHook = Box<dyn Fn(&Revoked) + Send + Sync>;

/// What the cache file holds. Older agents wrote the bare serial map.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Known {
    /// Serial (lowercase hex, as issued) → identity.
    serials: BTreeMap<String, String>,
    /// SPIFFE ID → unix second before which its certificates are refused.
    #[serde(default)]
    identities: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CacheFile {
    Current(Known),
    SerialsOnly(BTreeMap<String, String>),
}

#[derive(Default)]
pub struct Revocations {
    known: RwLock<Known>,
    hook: OnceLock<RevocationHook>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("serials", &self.serial_count())
            .field("identities", &self.identity_count())
            .finish_non_exhaustive()
    }
}

impl Revocations {
    /// Records a revoked serial; `true` when the serial is new.
    pub fn revoke(&self, serial: &str, identity: &str) -> bool {
        let serial = serial.trim().to_ascii_lowercase();
        if serial.is_empty() {
            warn!(
                identity,
                "certificate-revoked event without a serial; ignored"
            );
            return false;
        }
        let new = self
            .write()
            .serials
            .insert(serial.clone(), identity.to_string())
            .is_none();
        if new {
            info!(%serial, identity, "certificate revoked");
            self.notify(&Revoked::Serial {
                serial,
                identity: identity.to_string(),
            });
        }
        new
    }

    /// Records that every certificate of `identity` issued before `before`
    /// (unix seconds) is revoked; `true` when that moves the instant later.
    pub fn revoke_identity(&self, identity: &str, before: u64) -> bool {
        let moved = {
            let mut known = self.write();
            let instant = known.identities.entry(identity.to_string()).or_insert(0);
            let moved = before > *instant;
            if moved {
                *instant = before;
            }
            moved
        };
        if moved {
            info!(
                identity,
                before, "identity revoked: its certificates issued before are refused"
            );
            self.notify(&Revoked::Identity {
                identity: identity.to_string(),
                before,
            });
        }
        moved
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Known> {
        self.known.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, revoked: &Revoked) {
        if let Some(hook) = self.hook.get() {
            hook(revoked);
        }
    }

    /// Hands every revocation, those known already and those to come, to
    /// `hook` (set once; later calls are ignored).
    pub fn on_revocation(&self, hook: RevocationHook) {
        if self.hook.set(hook).is_err() {
            return;
        }
        let known = self.read().clone();
        for (serial, identity) in known.serials {
            self.notify(&Revoked::Serial { serial, identity });
        }
        for (identity, before) in known.identities {
            self.notify(&Revoked::Identity { identity, before });
        }
    }

    pub fn serial_count(&self) -> usize {
        self.read().serials.len()
    }

    pub fn identity_count(&self) -> usize {
        self.read().identities.len()
    }

    pub fn load(&self, path: &Path) {
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        match serde_json::from_str::<CacheFile>(&text) {
            Ok(cached) => {
                let known = match cached {
                    CacheFile::Current(known) => known,
                    CacheFile::SerialsOnly(serials) => Known {
                        serials,
                        identities: BTreeMap::new(),
                    },
                };
                info!(
                    serials = known.serials.len(),
                    identities = known.identities.len(),
                    cache = %path.display(),
                    "revocations loaded"
                );
                *self.write() = known;
            }
            Err(error) => warn!(%error, cache = %path.display(), "revocation cache unreadable"),
        }
    }

    /// The JSON of the list, for the cache writer.
    pub fn to_json(&self) -> std::io::Result<String> {
        serde_json::to_string(&*self.read()).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn each_revocation_reaches_the_hook_once_including_those_known_before() {
        let revocations = Revocations::default();
        assert!(revocations.revoke("0A1B", "spiffe://td/ns/a/sa/b"));
        assert!(revocations.revoke_identity("spiffe://td/ns/a/sa/d", 100));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        revocations.on_revocation(Box::new(move |revoked| {
            sink.lock().unwrap().push(revoked.clone())
        }));
        assert!(
            !revocations.revoke("0a1b", "spiffe://td/ns/a/sa/b"),
            "same serial"
        );
        assert!(revocations.revoke("ff", "spiffe://td/ns/a/sa/c"));
        assert!(!revocations.revoke(" ", "x"), "no serial, nothing revoked");
        assert!(!revocations.revoke_identity("spiffe://td/ns/a/sa/d", 90));
        assert!(revocations.revoke_identity("spiffe://td/ns/a/sa/d", 200));
        let serial = |serial: &str, identity: &str| Revoked::Serial {
            serial: serial.into(),
            identity: identity.into(),
        };
        let identity = |before| Revoked::Identity {
            identity: "spiffe://td/ns/a/sa/d".into(),
            before,
        };
        assert_eq!(
            *seen.lock().unwrap(),
            [
                serial("0a1b", "spiffe://td/ns/a/sa/b"),
                identity(100),
                serial("ff", "spiffe://td/ns/a/sa/c"),
                identity(200),
            ]
        );
        assert_eq!(
            (revocations.serial_count(), revocations.identity_count()),
            (2, 1)
        );
    }

    #[test]
    fn the_cache_round_trips_and_the_older_serial_only_file_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked-serials.json");
        let revocations = Revocations::default();
        revocations.revoke("0a", "spiffe://td/ns/a/sa/b");
        revocations.revoke_identity("spiffe://td/ns/a/sa/c", 7);
        std::fs::write(&path, revocations.to_json().unwrap()).unwrap();
        let loaded = Revocations::default();
        loaded.load(&path);
        assert_eq!((loaded.serial_count(), loaded.identity_count()), (1, 1));

        std::fs::write(
            &path,
            r#"{"0b":"spiffe://td/ns/a/sa/b","0c":"spiffe://td/ns/a/sa/b"}"#,
        )
        .unwrap();
        let older = Revocations::default();
        older.load(&path);
        assert_eq!((older.serial_count(), older.identity_count()), (2, 0));
    }
}
