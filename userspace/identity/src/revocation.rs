//! What is revoked: single certificates (by serial) and whole identities.
//!
//! Revoking a serial refuses one certificate. Revoking an identity refuses
//! every certificate of that SPIFFE ID issued before an instant — the answer
//! to a compromised workload, whose keys may sit on several nodes under
//! serials nobody has collected. The holders re-key and get certificates
//! issued after the instant, which are accepted again.
//!
//! "Issued at" is the leaf's notBefore plus [`ISSUE_BACKDATE`] (Veil's CA
//! backdates leaves for clocks that lag). Times are whole seconds, as in
//! X.509: a revocation instant is rounded *up* to the next second by whoever
//! revokes (see [`revocation_instant`]), so a certificate issued in the
//! revoking second is refused, and a holder re-keying waits until the
//! instant has passed ([`RevocationList::reissue_not_before`]).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use crate::ca::ISSUE_BACKDATE;
use crate::{spiffe::SpiffeId, verify::Rejection};

/// Serials and identities refused by verifiers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RevocationList {
    /// Lowercase hex serials, as issued.
    serials: HashSet<String>,
    /// SPIFFE ID → unix second before which its certificates are refused.
    identities: HashMap<String, u64>,
}

impl RevocationList {
    /// Refuses one certificate; `true` when it was not refused before.
    pub fn revoke_serial(&mut self, serial: &str) -> bool {
        self.serials.insert(serial.trim().to_ascii_lowercase())
    }

    /// Refuses every certificate of `identity` issued before `before` (unix
    /// seconds); `true` when this moves the instant later.
    pub fn revoke_identity(&mut self, identity: &str, before: u64) -> bool {
        let instant = self.identities.entry(identity.to_string()).or_insert(0);
        if before > *instant {
            *instant = before;
            true
        } else {
            false
        }
    }

    /// Grows with every revocation that refuses something more (serials are
    /// only added, identity instants only move later): a session established
    /// under an older version may involve a certificate refused since.
    pub fn version(&self) -> u64 {
        self.serials.len() as u64 + self.identities.values().sum::<u64>()
    }

    /// Whether a leaf with this serial, identity and notBefore (unix
    /// seconds) is refused, and why.
    pub fn check(
        &self,
        serial: &str,
        identity: &SpiffeId,
        not_before: i64,
    ) -> Result<(), Rejection> {
        if self.serials.contains(serial) {
            return Err(Rejection::Revoked {
                serial: serial.to_string(),
            });
        }
        let identity = identity.to_string();
        if let Some(&before) = self.identities.get(&identity) {
            let issued_at = not_before.saturating_add(ISSUE_BACKDATE.as_secs() as i64);
            if issued_at < before as i64 {
                return Err(Rejection::IdentityRevoked {
                    identity,
                    issued_at,
                    revoked_before: before as i64,
                });
            }
        }
        Ok(())
    }

    /// When a holder of `identity` may have its new certificate signed so
    /// that it is not refused: `None` when the identity is not revoked.
    pub fn reissue_not_before(&self, identity: &str) -> Option<SystemTime> {
        self.identities
            .get(identity)
            .map(|&before| UNIX_EPOCH + Duration::from_secs(before))
    }

    pub fn serial_count(&self) -> usize {
        self.serials.len()
    }

    pub fn identity_count(&self) -> usize {
        self.identities.len()
    }
}

/// The revocation instant for "revoke now": the next whole second, so
/// every certificate issued up to this moment is refused.
pub fn revocation_instant(now: SystemTime) -> u64 {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    since_epoch.as_secs() + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertificateAuthority, WorkloadKey, ca::DEFAULT_LEAF_LIFETIME};

    #[test]
    fn the_version_grows_only_when_more_is_refused() {
        let mut list = RevocationList::default();
        let mut seen = list.version();
        let mut step = |list: &RevocationList, grows: bool| {
            assert_eq!(list.version() > seen, grows, "{list:?}");
            seen = list.version();
        };
        list.revoke_serial("0a");
        step(&list, true);
        list.revoke_serial("0A");
        step(&list, false);
        list.revoke_identity("spiffe://cluster.local/ns/shop/sa/cart", 100);
        step(&list, true);
        list.revoke_identity("spiffe://cluster.local/ns/shop/sa/cart", 50);
        step(&list, false);
        list.revoke_identity("spiffe://cluster.local/ns/shop/sa/cart", 101);
        step(&list, true);
    }

    fn not_before_of(ca: &CertificateAuthority, id: &SpiffeId) -> i64 {
        let key = WorkloadKey::generate().unwrap();
        let issued = ca.sign(&key.csr_pem(id).unwrap(), id).unwrap();
        issued
            .not_before
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn an_identity_revocation_refuses_what_was_issued_before_and_accepts_what_comes_after() {
        let ca = CertificateAuthority::generate("td", DEFAULT_LEAF_LIFETIME).unwrap();
        let cart = SpiffeId::new("td", "shop", "cart").unwrap();
        let checkout = SpiffeId::new("td", "shop", "checkout").unwrap();
        let before = not_before_of(&ca, &cart);
        let mut list = RevocationList::default();
        let instant = revocation_instant(SystemTime::now());
        assert!(list.revoke_identity(&cart.to_string(), instant));
        assert!(
            !list.revoke_identity(&cart.to_string(), instant - 5),
            "an earlier instant changes nothing"
        );
        let refused = list.check("0a", &cart, before).unwrap_err();
        assert!(
            matches!(refused, Rejection::IdentityRevoked { .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("re-key"), "{refused}");
        // Another identity, and a certificate issued at the instant, pass.
        assert_eq!(list.check("0a", &checkout, before), Ok(()));
        let at_instant = instant as i64 - ISSUE_BACKDATE.as_secs() as i64;
        assert_eq!(list.check("0b", &cart, at_instant), Ok(()));
        assert_eq!(
            list.reissue_not_before(&cart.to_string()),
            Some(UNIX_EPOCH + Duration::from_secs(instant))
        );
        assert_eq!(list.reissue_not_before(&checkout.to_string()), None);
    }

    #[test]
    fn serials_are_matched_in_lowercase() {
        let mut list = RevocationList::default();
        let id = SpiffeId::new("td", "a", "b").unwrap();
        assert!(list.revoke_serial(" 0A1B "));
        assert!(!list.revoke_serial("0a1b"));
        assert_eq!(
            list.check("0a1b", &id, 0),
            Err(Rejection::Revoked {
                serial: "0a1b".into()
            })
        );
        assert_eq!((list.serial_count(), list.identity_count()), (1, 0));
    }
}
