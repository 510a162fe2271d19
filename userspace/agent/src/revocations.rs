//! Revoked workload certificates, learnt from the event bus.
//!
//! `certificate-revoked` events on `veil.certificates` name a serial (and
//! the identity it was issued to). Every agent adds the serial to the set its
//! mTLS verifiers refuse, at once, for new handshakes; an agent holding that
//! certificate itself throws its key away and has a new one issued. The set
//! survives restarts in the event cache directory (`revoked-serials.json`,
//! 0600), written before the offsets that carried it are committed.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{OnceLock, RwLock},
};

use tracing::{info, warn};

/// Called once for each newly revoked serial: `(serial, identity)`.
pub type RevocationHook = Box<dyn Fn(&str, &str) + Send + Sync>;

#[derive(Default)]
pub struct Revocations {
    /// Serial (lowercase hex, as issued) → identity.
    serials: RwLock<BTreeMap<String, String>>,
    hook: OnceLock<RevocationHook>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("serials", &self.len())
            .finish_non_exhaustive()
    }
}

impl Revocations {
    /// Records a revocation; `true` when the serial is new.
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
            .serials
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(serial.clone(), identity.to_string())
            .is_none();
        if new {
            info!(%serial, identity, "certificate revoked");
            if let Some(hook) = self.hook.get() {
                hook(&serial, identity);
            }
        }
        new
    }

    /// Hands every revocation, those known already and those to come, to
    /// `hook` (set once; later calls are ignored).
    pub fn on_revocation(&self, hook: RevocationHook) {
        if self.hook.set(hook).is_err() {
            return;
        }
        if let Some(hook) = self.hook.get() {
            let known = self
                .serials
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            for (serial, identity) in &known {
                hook(serial, identity);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.serials.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn load(&self, path: &Path) {
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        match serde_json::from_str::<BTreeMap<String, String>>(&text) {
            Ok(known) => {
                info!(serials = known.len(), cache = %path.display(), "revoked serials loaded");
                *self.serials.write().unwrap_or_else(|p| p.into_inner()) = known;
            }
            Err(error) => warn!(%error, cache = %path.display(), "revocation cache unreadable"),
        }
    }

    /// The JSON of the set, for the cache writer.
    pub fn to_json(&self) -> std::io::Result<String> {
        let serials = self.serials.read().unwrap_or_else(|p| p.into_inner());
        serde_json::to_string(&*serials).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn each_serial_reaches_the_hook_once_including_those_known_before() {
        let revocations = Revocations::default();
        assert!(revocations.revoke("0A1B", "spiffe://td/ns/a/sa/b"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        revocations.on_revocation(Box::new(move |serial, _| {
            sink.lock().unwrap().push(serial.to_string())
        }));
        assert!(
            !revocations.revoke("0a1b", "spiffe://td/ns/a/sa/b"),
            "same serial"
        );
        assert!(revocations.revoke("ff", "spiffe://td/ns/a/sa/c"));
        assert!(!revocations.revoke(" ", "x"), "no serial, nothing revoked");
        assert_eq!(*seen.lock().unwrap(), ["0a1b", "ff"]);
        assert_eq!(revocations.len(), 2);
    }
}
