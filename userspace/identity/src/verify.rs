//! Checking a peer's workload certificate: chain to a trusted root, validity
//! window, the SPIFFE ID the caller expects, and revocation — each failure
//! named, so logs and counters say why a peer was refused.

use std::time::SystemTime;

use x509_parser::{certificate::X509Certificate, extensions::GeneralName, pem::Pem};

use crate::{revocation::RevocationList, spiffe::SpiffeId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("certificate chain is malformed: {0}")]
    Malformed(String),
    #[error("certificate expired at {not_after} (unix seconds)")]
    Expired { not_after: i64 },
    #[error("certificate is not valid before {not_before} (unix seconds): check the clocks")]
    NotYetValid { not_before: i64 },
    #[error("certificate is for {found}, expected {expected}")]
    WrongIdentity { found: String, expected: String },
    #[error("certificate does not chain to a trusted root (unknown or retired CA)")]
    UnknownCa,
    #[error("certificate serial {serial} is revoked")]
    Revoked { serial: String },
    #[error(
        "certificate of {identity} was issued at {issued_at} (unix seconds), before the identity \
         was revoked at {revoked_before}: its holder must re-key"
    )]
    IdentityRevoked {
        identity: String,
        issued_at: i64,
        revoked_before: i64,
    },
}

/// Which identity a peer must present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected<'a> {
    /// Exactly this workload (a client checking the server it dialled).
    Identity(&'a SpiffeId),
    /// Any workload of this trust domain (a server, before authorization decides).
    TrustDomain(&'a str),
}

/// Verifies a leaf + intermediate chain (PEM) for `expected` at `now`.
pub fn verify_workload(
    chain_pem: &str,
    trust_bundle: &[String],
    expected: &SpiffeId,
    now: SystemTime,
    revoked: &RevocationList,
) -> Result<(), Rejection> {
    let chain = parse_all(chain_pem)?;
    let chain: Vec<&[u8]> = chain.iter().map(|pem| pem.contents.as_slice()).collect();
    let roots = trust_bundle
        .iter()
        .map(|pem| parse_all(pem))
        .collect::<Result<Vec<_>, _>>()?;
    let roots: Vec<&[u8]> = roots
        .iter()
        .flatten()
        .map(|pem| pem.contents.as_slice())
        .collect();
    verify_chain_der(&chain, &roots, &Expected::Identity(expected), now, revoked).map(drop)
}

/// Verifies a chain of DER certificates (leaf first, then its intermediate)
/// against DER roots; returns the peer's SPIFFE ID.
pub fn verify_chain_der(
    chain: &[&[u8]],
    roots: &[&[u8]],
    expected: &Expected<'_>,
    now: SystemTime,
    revoked: &RevocationList,
) -> Result<SpiffeId, Rejection> {
    verify_chain_der_with(chain, roots, expected, now, revoked, None)
}

/// [`verify_chain_der`], remembering verified signatures in `cache`.
pub fn verify_chain_der_cached(
    chain: &[&[u8]],
    roots: &[&[u8]],
    expected: &Expected<'_>,
    now: SystemTime,
    revoked: &RevocationList,
    cache: &ChainCache,
) -> Result<SpiffeId, Rejection> {
    verify_chain_der_with(chain, roots, expected, now, revoked, Some(cache))
}

fn verify_chain_der_with(
    chain: &[&[u8]],
    roots: &[&[u8]],
    expected: &Expected<'_>,
    now: SystemTime,
    revoked: &RevocationList,
    cache: Option<&ChainCache>,
) -> Result<SpiffeId, Rejection> {
    let [leaf_der, presented @ ..] = chain else {
        return Err(Rejection::Malformed(
            "expected a leaf and its intermediate".into(),
        ));
    };
    if presented.is_empty() {
        return Err(Rejection::Malformed(
            "expected a leaf and its intermediate".into(),
        ));
    }
    let leaf = certificate(leaf_der)?;
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);

    let validity = leaf.validity();
    if now < validity.not_before.timestamp() {
        return Err(Rejection::NotYetValid {
            not_before: validity.not_before.timestamp(),
        });
    }
    if now > validity.not_after.timestamp() {
        return Err(Rejection::Expired {
            not_after: validity.not_after.timestamp(),
        });
    }
    let uris: Vec<String> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(uri.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let found = || {
        if uris.is_empty() {
            "no SPIFFE ID".to_string()
        } else {
            uris.join(", ")
        }
    };
    let peer: SpiffeId = match &uris[..] {
        [one] => one.parse().map_err(|_| Rejection::WrongIdentity {
            found: found(),
            expected: expected.to_string(),
        })?,
        _ => {
            return Err(Rejection::WrongIdentity {
                found: found(),
                expected: expected.to_string(),
            });
        }
    };
    let matches = match expected {
        Expected::Identity(id) => &peer == *id,
        Expected::TrustDomain(domain) => peer.trust_domain() == *domain,
    };
    if !matches {
        return Err(Rejection::WrongIdentity {
            found: found(),
            expected: expected.to_string(),
        });
    }
    revoked.check(
        &serial_of(&leaf),
        &peer,
        leaf.validity().not_before.timestamp(),
    )?;
    // Peers may repeat the leaf or send extra certificates (openssl's
    // -cert_chain does): the intermediate is whichever CA signed the leaf.
    // Signatures are checked once per (leaf, intermediate, roots): validity,
    // identity and revocation above are checked every time.
    let roots_digest = cache.map(|_| digest_of(roots.iter().copied()));
    for candidate_der in presented {
        let Ok(candidate) = certificate(candidate_der) else {
            continue;
        };
        if !candidate.is_ca() || now > candidate.validity().not_after.timestamp() {
            continue;
        }
        let key = roots_digest.map(|roots| digest_of([*leaf_der, *candidate_der, &roots[..]]));
        if let (Some(cache), Some(key)) = (cache, key)
            && cache.contains(&key)
        {
            return Ok(peer);
        }
        if leaf.verify_signature(Some(candidate.public_key())).is_err() {
            continue;
        }
        let chained = roots.iter().any(|root_der| {
            certificate(root_der)
                .is_ok_and(|root| candidate.verify_signature(Some(root.public_key())).is_ok())
        });
        if !chained {
            return Err(Rejection::UnknownCa);
        }
        if let (Some(cache), Some(key)) = (cache, key) {
            cache.insert(key);
        }
        return Ok(peer);
    }
    Err(Rejection::UnknownCa)
}

/// Chains whose signatures were verified: (leaf, intermediate, roots)
/// digests. A handshake from a known workload then costs no signature
/// check of its chain; expiry, identity and revocation are checked anew.
#[derive(Debug, Default)]
pub struct ChainCache(std::sync::Mutex<std::collections::HashSet<[u8; 32]>>);

/// Verified chains remembered at most (then forgotten all at once).
const CHAIN_CACHE_LIMIT: usize = 4096;

impl ChainCache {
    fn contains(&self, key: &[u8; 32]) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    fn insert(&self, key: [u8; 32]) {
        let mut known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= CHAIN_CACHE_LIMIT {
            known.clear();
        }
        known.insert(key);
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// SHA-256 over length-prefixed parts (so part boundaries count).
fn digest_of<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// What revocation looks at in a leaf: enough to ask again later, after
/// the handshake, whether a session's peer has been revoked since
/// ([`RevocationList::check`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFacts {
    pub identity: SpiffeId,
    /// Lowercase hex, as [`RevocationList`] keeps serials.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
}

impl LeafFacts {
    /// Reads an already verified leaf certificate (DER).
    pub fn of(leaf_der: &[u8]) -> Result<Self, Rejection> {
        let leaf = certificate(leaf_der)?;
        Ok(Self {
            identity: spiffe_id_in(&leaf)?,
            serial: serial_of(&leaf),
            not_before: leaf.validity().not_before.timestamp(),
        })
    }

    /// Whether `revoked` refuses this certificate now.
    pub fn check(&self, revoked: &RevocationList) -> Result<(), Rejection> {
        revoked.check(&self.serial, &self.identity, self.not_before)
    }
}

/// A certificate's serial as revocations name it: lowercase hex, no colons.
fn serial_of(certificate: &X509Certificate<'_>) -> String {
    certificate
        .raw_serial_as_string()
        .replace(':', "")
        .to_ascii_lowercase()
}

/// The SPIFFE ID in an already verified leaf certificate (DER).
pub fn spiffe_id_of(leaf_der: &[u8]) -> Result<SpiffeId, Rejection> {
    spiffe_id_in(&certificate(leaf_der)?)
}

fn spiffe_id_in(leaf: &X509Certificate<'_>) -> Result<SpiffeId, Rejection> {
    let san = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .ok_or_else(|| Rejection::Malformed("no subject alternative name".into()))?;
    san.value
        .general_names
        .iter()
        .find_map(|name| match name {
            GeneralName::URI(uri) => uri.parse().ok(),
            _ => None,
        })
        .ok_or_else(|| Rejection::Malformed("no SPIFFE ID in the certificate".into()))
}

impl std::fmt::Display for Expected<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Identity(id) => write!(f, "{id}"),
            Self::TrustDomain(domain) => write!(f, "a workload of trust domain {domain}"),
        }
    }
}

fn parse_all(pem: &str) -> Result<Vec<Pem>, Rejection> {
    Pem::iter_from_buffer(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Rejection::Malformed(e.to_string()))
}

fn certificate(der: &[u8]) -> Result<X509Certificate<'_>, Rejection> {
    use x509_parser::prelude::FromDer;
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| Rejection::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{CertificateAuthority, WorkloadKey, ca::DEFAULT_LEAF_LIFETIME};

    fn setup() -> (CertificateAuthority, WorkloadKey, SpiffeId) {
        let ca = CertificateAuthority::generate("td", DEFAULT_LEAF_LIFETIME).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let id = SpiffeId::new("td", "shop", "cart").unwrap();
        (ca, key, id)
    }

    fn verify(
        chain: &str,
        ca: &CertificateAuthority,
        id: &SpiffeId,
        now: SystemTime,
    ) -> Result<(), Rejection> {
        verify_workload(
            chain,
            ca.trust_bundle(),
            id,
            now,
            &RevocationList::default(),
        )
    }

    #[test]
    fn a_fresh_certificate_verifies() {
        let (ca, key, id) = setup();
        let issued = ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
        verify(&issued.chain_pem, &ca, &id, SystemTime::now()).unwrap();
        let lifetime = issued.not_after.duration_since(issued.not_before).unwrap();
        assert!(lifetime >= DEFAULT_LEAF_LIFETIME, "{lifetime:?}");
    }

    #[test]
    fn expired_and_not_yet_valid_are_refused() {
        let (ca, key, id) = setup();
        let csr = key.csr_pem(&id).unwrap();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let old = ca
            .sign_valid(&csr, &id, now - 3 * hour, now - hour)
            .unwrap();
        assert!(matches!(
            verify(&old.chain_pem, &ca, &id, now),
            Err(Rejection::Expired { .. })
        ));
        let future = ca
            .sign_valid(&csr, &id, now + hour, now + 3 * hour)
            .unwrap();
        let error = verify(&future.chain_pem, &ca, &id, now).unwrap_err();
        assert!(matches!(error, Rejection::NotYetValid { .. }));
        assert!(error.to_string().contains("clocks"));
    }

    #[test]
    fn wrong_identity_wrong_ca_and_revoked_are_refused_with_their_reason() {
        let (ca, key, id) = setup();
        let issued = ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
        let other = SpiffeId::new("td", "shop", "checkout").unwrap();
        let error = verify(&issued.chain_pem, &ca, &other, SystemTime::now()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "certificate is for spiffe://td/ns/shop/sa/cart, expected spiffe://td/ns/shop/sa/checkout"
        );
        let stranger = CertificateAuthority::generate("td", DEFAULT_LEAF_LIFETIME).unwrap();
        assert_eq!(
            verify(&issued.chain_pem, &stranger, &id, SystemTime::now()),
            Err(Rejection::UnknownCa)
        );
        let mut revoked = RevocationList::default();
        revoked.revoke_serial(&issued.serial);
        assert_eq!(
            verify_workload(
                &issued.chain_pem,
                ca.trust_bundle(),
                &id,
                SystemTime::now(),
                &revoked
            ),
            Err(Rejection::Revoked {
                serial: issued.serial.clone()
            })
        );
    }

    #[test]
    fn a_cached_chain_skips_signatures_but_never_expiry_identity_or_revocation() {
        let (ca, key, id) = setup();
        let issued = ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
        let pems = parse_all(&issued.chain_pem).unwrap();
        let chain: Vec<&[u8]> = pems.iter().map(|p| p.contents.as_slice()).collect();
        let root_pems: Vec<Pem> = ca
            .trust_bundle()
            .iter()
            .flat_map(|pem| parse_all(pem).unwrap())
            .collect();
        let roots: Vec<&[u8]> = root_pems.iter().map(|p| p.contents.as_slice()).collect();
        let cache = ChainCache::default();
        let none = RevocationList::default();
        let now = SystemTime::now();
        let check = |expected: &SpiffeId, at: SystemTime, revoked: &RevocationList| {
            verify_chain_der_cached(
                &chain,
                &roots,
                &Expected::Identity(expected),
                at,
                revoked,
                &cache,
            )
        };
        assert_eq!(check(&id, now, &none), Ok(id.clone()));
        assert_eq!(cache.len(), 1, "remembered");
        assert_eq!(check(&id, now, &none), Ok(id.clone()), "from the cache");
        let other = SpiffeId::new("td", "shop", "checkout").unwrap();
        assert!(matches!(
            check(&other, now, &none),
            Err(Rejection::WrongIdentity { .. })
        ));
        let mut revoked = RevocationList::default();
        revoked.revoke_serial(&issued.serial);
        assert!(matches!(
            check(&id, now, &revoked),
            Err(Rejection::Revoked { .. })
        ));
        let later = now + std::time::Duration::from_secs(400 * 24 * 3600);
        assert!(matches!(
            check(&id, later, &none),
            Err(Rejection::Expired { .. })
        ));
        // Other roots: not what was verified, so checked (and refused).
        let stranger = CertificateAuthority::generate("td", DEFAULT_LEAF_LIFETIME).unwrap();
        let stranger_roots: Vec<Pem> = stranger
            .trust_bundle()
            .iter()
            .flat_map(|pem| parse_all(pem).unwrap())
            .collect();
        let stranger_roots: Vec<&[u8]> = stranger_roots
            .iter()
            .map(|p| p.contents.as_slice())
            .collect();
        assert_eq!(
            verify_chain_der_cached(
                &chain,
                &stranger_roots,
                &Expected::Identity(&id),
                now,
                &none,
                &cache
            ),
            Err(Rejection::UnknownCa)
        );
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn root_rotation_keeps_old_leaves_valid_until_the_old_root_is_retired() {
        let (mut ca, key, id) = setup();
        let csr = key.csr_pem(&id).unwrap();
        let before = ca.sign(&csr, &id).unwrap();
        ca.rotate_root().unwrap();
        let after = ca.sign(&csr, &id).unwrap();
        assert_eq!(ca.trust_bundle().len(), 2);
        let now = SystemTime::now();
        verify(&before.chain_pem, &ca, &id, now).unwrap();
        verify(&after.chain_pem, &ca, &id, now).unwrap();
        ca.retire_previous_roots();
        assert_eq!(
            verify(&before.chain_pem, &ca, &id, now),
            Err(Rejection::UnknownCa)
        );
        verify(&after.chain_pem, &ca, &id, now).unwrap();
    }

    #[test]
    fn an_imported_root_signs_through_a_new_intermediate() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let root = params.self_signed(&key).unwrap();
        let ca = CertificateAuthority::import(
            "td",
            &root.pem(),
            &key.serialize_pem(),
            DEFAULT_LEAF_LIFETIME,
        )
        .unwrap();
        let workload = WorkloadKey::generate().unwrap();
        let id = SpiffeId::new("td", "a", "b").unwrap();
        let issued = ca.sign(&workload.csr_pem(&id).unwrap(), &id).unwrap();
        verify_workload(
            &issued.chain_pem,
            &[root.pem()],
            &id,
            SystemTime::now(),
            &RevocationList::default(),
        )
        .unwrap();
    }

    #[test]
    fn the_ca_signs_only_what_the_caller_is_entitled_to() {
        let (ca, key, id) = setup();
        let other = SpiffeId::new("td", "shop", "admin").unwrap();
        let error = ca
            .sign(&key.csr_pem(&other).unwrap(), &id)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("entitled to spiffe://td/ns/shop/sa/cart only"),
            "{error}"
        );
        let foreign = SpiffeId::new("elsewhere", "shop", "cart").unwrap();
        let error = ca
            .sign(&key.csr_pem(&foreign).unwrap(), &foreign)
            .unwrap_err()
            .to_string();
        assert!(error.contains("outside this CA's trust domain"), "{error}");
    }

    #[test]
    fn serials_read_back_exactly_as_issued() {
        // A random serial whose first byte were zero would lose it in DER.
        let (ca, key, id) = setup();
        let csr = key.csr_pem(&id).unwrap();
        for _ in 0..1000 {
            let issued = ca.sign(&csr, &id).unwrap();
            let chain = parse_all(&issued.chain_pem).unwrap();
            let leaf = certificate(&chain[0].contents).unwrap();
            assert_eq!(leaf.raw_serial_as_string().replace(':', ""), issued.serial);
        }
    }

    #[test]
    fn a_repeated_leaf_in_the_presented_chain_is_tolerated() {
        let (ca, key, id) = setup();
        let issued = ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
        let chain = parse_all(&issued.chain_pem).unwrap();
        let roots = parse_all(&ca.trust_bundle()[0]).unwrap();
        let presented = [
            chain[0].contents.as_slice(),
            chain[0].contents.as_slice(),
            chain[1].contents.as_slice(),
        ];
        let peer = verify_chain_der(
            &presented,
            &[roots[0].contents.as_slice()],
            &Expected::TrustDomain("td"),
            SystemTime::now(),
            &RevocationList::default(),
        )
        .unwrap();
        assert_eq!(peer, id);
    }

    #[test]
    fn leaves_are_end_entities_for_both_tls_roles() {
        let (ca, key, id) = setup();
        let issued = ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
        let chain = parse_all(&issued.chain_pem).unwrap();
        let leaf = certificate(&chain[0].contents).unwrap();
        assert!(!leaf.is_ca());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(leaf.raw_serial_as_string().replace(':', ""), issued.serial);
    }

    #[test]
    fn leaf_facts_answer_a_later_revocation_of_the_serial_or_the_identity() {
        let (ca, key, id) = setup();
        let issued = ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
        let chain = parse_all(&issued.chain_pem).unwrap();
        let facts = LeafFacts::of(&chain[0].contents).unwrap();
        assert_eq!(facts.identity, id);
        assert_eq!(facts.serial, issued.serial);
        let mut revoked = RevocationList::default();
        facts.check(&revoked).unwrap();
        revoked.revoke_serial(&issued.serial.to_ascii_uppercase());
        assert!(matches!(
            facts.check(&revoked),
            Err(Rejection::Revoked { .. })
        ));
        let mut revoked = RevocationList::default();
        let after_issue = issued
            .not_before
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        revoked.revoke_identity(&id.to_string(), after_issue);
        assert!(matches!(
            facts.check(&revoked),
            Err(Rejection::IdentityRevoked { .. })
        ));
        assert!(LeafFacts::of(b"not a certificate").is_err());
    }
}
