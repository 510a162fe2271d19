//! Workload certificates on this node: keys made here, certificates signed by
//! the mesh CA, kept in memory and renewed before they expire.
//!
//! One certificate per identity (namespace + service account), shared by the
//! node's pods of that identity, as Istio does. A certificate is issued on
//! first use and replaced once 2/3 of its lifetime has passed; connections
//! already established keep the session they have, new ones get the new
//! certificate. Private keys exist only in this process (zeroized on drop)
//! and never appear in logs or `Debug` output.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::sign::CertifiedKey;
use tracing::{info, warn};
use veil_identity::{
    CertificateAuthority, SpiffeId, WorkloadKey, renewal::RenewalPolicy,
    revocation::ISSUE_BACKDATE, spiffe::SpiffeIdError,
};
use veil_mtls::{TlsSettings, WorkloadCredentials, settings::SettingsError};

use super::signer::{LocalCaSigner, Signer};

use crate::inventory::PodMesh;

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("invalid workload identity: {0}")]
    Identity(#[from] SpiffeIdError),
    #[error("cannot make a key for {identity}: {message}")]
    Key { identity: String, message: String },
    #[error("cannot get {identity} signed: {message}")]
    Sign { identity: String, message: String },
    #[error("the certificate for {identity} is unusable: {source}")]
    Credentials {
        identity: String,
        source: SettingsError,
    },
}

/// One identity's current certificate and key.
pub struct Workload {
    pub identity: SpiffeId,
    pub credentials: WorkloadCredentials,
    /// The same, in the form a server certificate resolver returns.
    pub certified: Arc<CertifiedKey>,
    pub serial: String,
    /// When the CA signed it (notBefore plus the CA's backdating), whole
    /// seconds: what an identity revocation is compared with.
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
    pub renew_at: SystemTime,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// The certificates of this node's workloads.
pub struct WorkloadStore {
    signer: Box<dyn Signer>,
    trust_domain: String,
    trust_bundle: Vec<String>,
    settings: TlsSettings,
    renewal: RenewalPolicy,
    entries: Mutex<HashMap<SpiffeId, Arc<Workload>>>,
    /// The last failure to issue, per identity, until an issue succeeds.
    errors: Mutex<HashMap<SpiffeId, String>>,
    /// Told of every certificate issued: the new one, and the serial it replaces.
    on_issue: std::sync::OnceLock<IssueHook>,
    /// Identities revoked on the bus: certificates issued before the instant
    /// are not used, and new ones are signed only after it.
    revoked_before: Mutex<HashMap<SpiffeId, SystemTime>>,
    /// One gate per identity: one issue at a time for it, others in parallel.
    issuing: Mutex<HashMap<SpiffeId, Arc<Mutex<()>>>>,
}

/// How long after an identity's revocation instant its new certificate is
/// signed: covers a signer whose clock is a little behind the revoker's.
const REISSUE_MARGIN: Duration = Duration::from_secs(1);
/// The longest an issue waits for a revocation instant (an instant far in
/// the future is a clock problem, not something to sleep through).
const REISSUE_WAIT_LIMIT: Duration = Duration::from_secs(5);

/// Called after a certificate is issued: `(new, previous serial)`.
pub type IssueHook = Box<dyn Fn(&Workload, Option<&str>) + Send + Sync>;

impl WorkloadStore {
    /// A store that signs with the mesh CA itself.
    pub fn new(ca: CertificateAuthority, settings: TlsSettings) -> Self {
        let trust_domain = ca.trust_domain().to_string();
        let trust_bundle = ca.trust_bundle().to_vec();
        Self::with_signer(
            Box::new(LocalCaSigner(ca)),
            trust_domain,
            trust_bundle,
            settings,
        )
    }

    /// A store whose CSRs `signer` signs; `trust_bundle` is the mesh's roots (PEM).
    pub fn with_signer(
        signer: Box<dyn Signer>,
        trust_domain: String,
        trust_bundle: Vec<String>,
        settings: TlsSettings,
    ) -> Self {
        Self {
            signer,
            trust_domain,
            trust_bundle,
            settings,
            renewal: RenewalPolicy::default(),
            entries: Mutex::default(),
            errors: Mutex::default(),
            on_issue: std::sync::OnceLock::new(),
            revoked_before: Mutex::default(),
            issuing: Mutex::default(),
        }
    }

    /// Tells `hook` of every certificate held now (as issued) and every one
    /// issued from now on (set once).
    pub fn on_issue(&self, hook: IssueHook) {
        if self.on_issue.set(hook).is_err() {
            return;
        }
        if let Some(hook) = self.on_issue.get() {
            for workload in self.all() {
                hook(&workload, None);
            }
        }
    }

    /// Who signs: the local CA of the trust domain.
    pub fn issuer_name(&self) -> String {
        self.signer.describe()
    }

    /// Why the last attempt to issue for `identity` failed, if it did.
    pub fn last_error(&self, identity: &SpiffeId) -> Option<String> {
        let errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        errors.get(identity).cloned()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn trust_bundle(&self) -> &[String] {
        &self.trust_bundle
    }

    /// The SPIFFE ID of a meshed pod.
    pub fn identity_of(&self, mesh: &PodMesh) -> Result<SpiffeId, WorkloadError> {
        Ok(SpiffeId::new(
            self.trust_domain(),
            &mesh.namespace,
            &mesh.service_account,
        )?)
    }

    /// The certificate of `identity` if it needs no renewal now.
    fn usable(&self, identity: &SpiffeId) -> Option<Arc<Workload>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(identity)
            .filter(|current| SystemTime::now() < current.renew_at && !self.is_revoked(current))
            .cloned()
    }

    /// The current certificate of `identity`, issued or renewed if needed.
    /// Issues for different identities run at once (a signature through the
    /// controller takes a round trip); callers asking for the same identity
    /// wait for the one issue.
    pub fn get(&self, identity: &SpiffeId) -> Result<Arc<Workload>, WorkloadError> {
        if let Some(current) = self.usable(identity) {
            return Ok(current);
        }
        let gate = {
            let mut gates = self.issuing.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(gates.entry(identity.clone()).or_default())
        };
        let _issuing = gate.lock().unwrap_or_else(|p| p.into_inner());
        // Issued by whoever held the gate before us?
        if let Some(current) = self.usable(identity) {
            return Ok(current);
        }
        let previous = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries.get(identity).map(|w| w.serial.clone())
        };
        let renewed = previous.is_some();
        let issued = self.issue(identity);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        let workload = match issued {
            Ok(workload) => {
                errors.remove(identity);
                Arc::new(workload)
            }
            Err(error) => {
                errors.insert(identity.clone(), error.to_string());
                // Keep serving with the still-valid certificate, if any.
                if let Some(current) = entries.get(identity)
                    && SystemTime::now() < current.not_after
                    && !self.is_revoked(current)
                {
                    warn!(identity = %identity, %error, "certificate renewal failed; the current one stays in use");
                    return Ok(Arc::clone(current));
                }
                return Err(error);
            }
        };
        drop(errors);
        info!(
            identity = %identity,
            serial = %workload.serial,
            not_after = %humantime::format_rfc3339_seconds(workload.not_after),
            renewed,
            "workload certificate issued"
        );
        entries.insert(identity.clone(), Arc::clone(&workload));
        drop(entries);
        if let Some(hook) = self.on_issue.get() {
            hook(&workload, previous.as_deref());
        }
        Ok(workload)
    }

    /// Makes sure each of `identities` has a usable certificate, issuing up
    /// to `parallelism` at once; returns the failures.
    pub fn ensure_all(
        &self,
        identities: &[SpiffeId],
        parallelism: usize,
    ) -> Vec<(SpiffeId, WorkloadError)> {
        let failures = Mutex::new(Vec::new());
        self.ensure_all_with(identities, parallelism, |identity, result| {
            if let Err(error) = result {
                failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((identity.clone(), error));
            }
        });
        failures.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// [`Self::ensure_all`], telling `done` of each identity that needed a
    /// certificate as soon as its issue ends.
    pub fn ensure_all_with(
        &self,
        identities: &[SpiffeId],
        parallelism: usize,
        done: impl Fn(&SpiffeId, Result<Arc<Workload>, WorkloadError>) + Sync,
    ) {
        let wanted: Vec<&SpiffeId> = identities
            .iter()
            .filter(|identity| self.usable(identity).is_none())
            .collect();
        if wanted.is_empty() {
            return;
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..parallelism.clamp(1, wanted.len()) {
                scope.spawn(|| {
                    while let Some(identity) =
                        wanted.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                    {
                        done(identity, self.get(identity));
                    }
                });
            }
        });
    }

    /// Drops the certificate (and key) with `serial`, if this store holds
    /// it; the next [`Self::get`] issues a new one with a new key.
    pub fn forget_serial(&self, serial: &str) -> Option<SpiffeId> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let identity = entries
            .iter()
            .find(|(_, workload)| workload.serial.eq_ignore_ascii_case(serial))
            .map(|(identity, _)| identity.clone())?;
        entries.remove(&identity);
        Some(identity)
    }

    /// Records that `identity`'s certificates issued before `before` are
    /// revoked, and drops the one this store holds if it is such; `true`
    /// when one was dropped (the next [`Self::get`] issues a new key, signed
    /// after the instant).
    pub fn forget_issued_before(&self, identity: &SpiffeId, before: SystemTime) -> bool {
        {
            let mut revoked = self
                .revoked_before
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let instant = revoked.entry(identity.clone()).or_insert(before);
            *instant = (*instant).max(before);
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let stale = entries
            .get(identity)
            .is_some_and(|current| self.is_revoked(current));
        if stale {
            entries.remove(identity);
        }
        stale
    }

    fn revoked_instant(&self, identity: &SpiffeId) -> Option<SystemTime> {
        let revoked = self
            .revoked_before
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        revoked.get(identity).copied()
    }

    fn is_revoked(&self, workload: &Workload) -> bool {
        self.revoked_instant(&workload.identity)
            .is_some_and(|before| workload.issued_at < before)
    }

    /// Every certificate held now (for status).
    pub fn all(&self) -> Vec<Arc<Workload>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.values().cloned().collect()
    }

    fn issue(&self, identity: &SpiffeId) -> Result<Workload, WorkloadError> {
        let key_error = |message: String| WorkloadError::Key {
            identity: identity.to_string(),
            message,
        };
        if let Some(before) = self.revoked_instant(identity) {
            let wait = (before + REISSUE_MARGIN)
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            if wait > REISSUE_WAIT_LIMIT {
                warn!(identity = %identity, ?wait, "the identity's revocation instant is far ahead of this clock; issuing now (check the clocks)");
            } else if !wait.is_zero() {
                info!(identity = %identity, ?wait, "waiting for the identity's revocation instant before re-issuing");
                std::thread::sleep(wait);
            }
        }
        let issued_at = SystemTime::now();
        let key = WorkloadKey::generate().map_err(|e| key_error(e.to_string()))?;
        let csr = key
            .csr_pem(identity)
            .map_err(|e| key_error(e.to_string()))?;
        let issued = self
            .signer
            .sign(identity, &csr)
            .map_err(|message| WorkloadError::Sign {
                identity: identity.to_string(),
                message,
            })?;
        let unusable = |source| WorkloadError::Credentials {
            identity: identity.to_string(),
            source,
        };
        let credentials = WorkloadCredentials::new(&issued, &key).map_err(unusable)?;
        let certified = credentials
            .certified_key(&self.settings)
            .map_err(unusable)?;
        if let Err(error) = self.signer.issued(identity, &issued, &key) {
            // The mesh keeps working with the certificate; only the copy the
            // user asked for is missing (retried at the next issue).
            warn!(identity = %identity, %error, "certificate issued, but its Secret was not written");
        }
        Ok(Workload {
            identity: identity.clone(),
            credentials,
            certified,
            serial: issued.serial,
            issued_at: issued.not_before + ISSUE_BACKDATE,
            not_after: issued.not_after,
            // From the moment of issue, not from `not_before`: that is set
            // back for clock skew, which would make short lifetimes renew at once.
            renew_at: self.renewal.renew_at(issued_at, issued.not_after),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::MeshMode;

    fn store() -> WorkloadStore {
        let ca = CertificateAuthority::generate(
            "cluster.local",
            std::time::Duration::from_secs(24 * 3600),
        )
        .unwrap();
        WorkloadStore::new(ca, TlsSettings::default())
    }

    #[test]
    fn a_certificate_is_issued_once_and_reused_until_renewal() {
        let store = store();
        let id = store
            .identity_of(&PodMesh {
                namespace: "shop".into(),
                service_account: "cart".into(),
                mode: Some(MeshMode::Strict),
            })
            .unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        let first = store.get(&id).unwrap();
        let again = store.get(&id).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert!(first.renew_at < first.not_after);
        assert_eq!(store.all().len(), 1);
        let debug = format!("{first:?}");
        assert!(!debug.contains("BEGIN"), "{debug}");
        assert!(
            debug.contains("cart") && !debug.contains("PRIVATE"),
            "{debug}"
        );
    }

    #[test]
    fn an_identity_revoked_after_issue_gets_a_new_certificate_signed_after_the_instant() {
        let store = store();
        let id = SpiffeId::new("cluster.local", "shop", "cart").unwrap();
        let other = SpiffeId::new("cluster.local", "shop", "checkout").unwrap();
        let first = store.get(&id).unwrap();
        let untouched = store.get(&other).unwrap();
        let instant = std::time::UNIX_EPOCH
            + Duration::from_secs(veil_identity::revocation::revocation_instant(
                SystemTime::now(),
            ));
        assert!(store.forget_issued_before(&id, instant));
        assert!(!store.forget_issued_before(&id, instant), "already gone");
        let second = store.get(&id).unwrap();
        assert_ne!(first.serial, second.serial);
        assert!(second.issued_at >= instant, "signed after the instant");
        assert!(SystemTime::now() >= instant + REISSUE_MARGIN);
        assert!(Arc::ptr_eq(&untouched, &store.get(&other).unwrap()));
    }

    #[test]
    fn ensure_all_issues_each_missing_identity_once() {
        let store = store();
        let ids: Vec<SpiffeId> = (0..20)
            .map(|i| SpiffeId::new("cluster.local", "shop", &format!("sa-{i}")).unwrap())
            .collect();
        let held = store.get(&ids[0]).unwrap();
        assert!(store.ensure_all(&ids, 4).is_empty());
        assert_eq!(store.all().len(), 20);
        assert!(
            Arc::ptr_eq(&held, &store.get(&ids[0]).unwrap()),
            "not re-issued"
        );
        assert!(store.ensure_all(&ids, 4).is_empty(), "nothing left to do");
    }
}
