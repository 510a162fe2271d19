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
    time::SystemTime,
};

use rustls::sign::CertifiedKey;
use tracing::{info, warn};
use veil_identity::{
    CertificateAuthority, SpiffeId, WorkloadKey, renewal::RenewalPolicy, spiffe::SpiffeIdError,
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
}

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

    /// The current certificate of `identity`, issued or renewed if needed.
    pub fn get(&self, identity: &SpiffeId) -> Result<Arc<Workload>, WorkloadError> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(current) = entries.get(identity)
            && SystemTime::now() < current.renew_at
        {
            return Ok(Arc::clone(current));
        }
        let previous = entries.get(identity).map(|w| w.serial.clone());
        let renewed = previous.is_some();
        let issued = self.issue(identity);
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
        Ok(Workload {
            identity: identity.clone(),
            credentials,
            certified,
            serial: issued.serial,
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
        assert!(
            debug.contains("cart") && !debug.contains("PRIVATE"),
            "{debug}"
        );
    }
}
