//! rustls client configurations, made once per (source workload
//! certificate, destination identity) instead of once per connection.
//!
//! A configuration holds the source workload's chain and parsed key and a
//! verifier that expects the destination's SPIFFE ID; building one parses
//! the key (a P-256 scalar multiplication) and allocates a provider, which
//! each new mTLS connection used to pay. A rotated or re-keyed certificate
//! has a new serial, so its configurations are made anew; the trust state
//! (roots, revocations) is shared and updated in place, so cached
//! configurations see every revocation at once.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use rustls::ClientConfig;
use veil_identity::SpiffeId;
use veil_mtls::{TlsSettings, settings::SettingsError, verifier::ExpectedPeer};

use super::workloads::Workload;

/// Configurations remembered at most (then all are forgotten at once).
const LIMIT: usize = 4096;

/// (source, destination) → (source certificate serial, configuration).
type Entries = HashMap<(SpiffeId, SpiffeId), (String, Arc<ClientConfig>)>;

#[derive(Default)]
pub struct ClientConfigs {
    entries: Mutex<Entries>,
}

impl ClientConfigs {
    /// The configuration for `source` (its current certificate) dialling a
    /// workload that must be `destination`.
    pub fn get(
        &self,
        settings: &TlsSettings,
        trust: &Arc<veil_mtls::verifier::TrustState>,
        source: &Workload,
        destination: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, SettingsError> {
        let key = (source.identity.clone(), destination.clone());
        if let Some((serial, config)) = self.lock().get(&key)
            && *serial == source.serial
        {
            return Ok(Arc::clone(config));
        }
        let config = Arc::new(settings.client_config(
            &source.credentials,
            Arc::clone(trust),
            ExpectedPeer::Identity(destination.clone()),
        )?);
        let mut entries = self.lock();
        if entries.len() >= LIMIT {
            entries.clear();
        }
        entries.insert(key, (source.serial.clone(), Arc::clone(&config)));
        Ok(config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use veil_identity::CertificateAuthority;

    use super::*;
    use crate::mesh::workloads::WorkloadStore;

    #[test]
    fn one_configuration_per_certificate_and_destination() {
        let ca = CertificateAuthority::generate(
            "cluster.local",
            std::time::Duration::from_secs(24 * 3600),
        )
        .unwrap();
        let store = WorkloadStore::new(ca, TlsSettings::default());
        let cart = SpiffeId::new("cluster.local", "shop", "cart").unwrap();
        let checkout = SpiffeId::new("cluster.local", "shop", "checkout").unwrap();
        let db = SpiffeId::new("cluster.local", "shop", "db").unwrap();
        let (settings, trust) = (TlsSettings::default(), Arc::default());
        let configs = ClientConfigs::default();
        let source = store.get(&cart).unwrap();
        let first = configs.get(&settings, &trust, &source, &checkout).unwrap();
        let again = configs.get(&settings, &trust, &source, &checkout).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "reused");
        let other = configs.get(&settings, &trust, &source, &db).unwrap();
        assert!(!Arc::ptr_eq(&first, &other), "per destination");
        // A re-keyed source gets a configuration with its new certificate.
        store.forget_serial(&source.serial).unwrap();
        let rekeyed = store.get(&cart).unwrap();
        let renewed = configs.get(&settings, &trust, &rekeyed, &checkout).unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert_eq!(configs.len(), 2);
    }
}
