//! The local certificate authority: a root, an intermediate that signs
//! workload certificates, and a trust bundle that overlaps across root rotation.
//!
//! Leaves are ECDSA P-256 with exactly one URI SAN (the SPIFFE ID), serverAuth
//! and clientAuth, digitalSignature only, never a CA, 24 h by default. The CA
//! signs CSRs: it never sees a workload's private key.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::spiffe::SpiffeId;

/// Default lifetime of workload certificates.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of the root and of each intermediate.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Leaves start a minute in the past, for clocks that lag a little (so a
/// leaf's issue time is its notBefore plus this).
pub const ISSUE_BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CSR is not a valid, self-signed PKCS#10 request: {0}")]
    Csr(rcgen::Error),
    #[error("the CSR asks for {asked}, but the caller is entitled to {expected} only")]
    WrongIdentity { asked: String, expected: String },
    #[error("{identity} is outside this CA's trust domain {trust_domain}")]
    WrongTrustDomain {
        identity: String,
        trust_domain: String,
    },
    #[error("the CSR's key is not ECDSA P-256")]
    WrongKeyType,
    #[error("cannot sign: {0}")]
    Sign(rcgen::Error),
    #[error("cannot import the root CA: {0}")]
    Import(String),
}

/// A signed workload certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub identity: SpiffeId,
    /// Leaf then intermediate, PEM.
    pub chain_pem: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

struct Authority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// The local CA of one trust domain.
pub struct CertificateAuthority {
    trust_domain: String,
    /// Roots in the trust bundle, newest last; only the newest signs.
    roots: Vec<String>,
    root: Authority,
    intermediate: Authority,
    leaf_lifetime: Duration,
}

impl CertificateAuthority {
    /// A new root and intermediate for `trust_domain`.
    pub fn generate(trust_domain: &str, leaf_lifetime: Duration) -> Result<Self, CaError> {
        let root = new_authority(
            &format!("Veil root CA ({trust_domain})"),
            ROOT_LIFETIME,
            None,
        )?;
        Self::with_root(trust_domain, root, leaf_lifetime)
    }

    /// A new self-signed root for `trust_domain`, as PEM (certificate, key):
    /// what an operator stores once and gives to [`Self::import`]. The key
    /// is zeroized when dropped.
    pub fn new_root_pem(
        trust_domain: &str,
    ) -> Result<(String, zeroize::Zeroizing<String>), CaError> {
        let root = new_authority(
            &format!("Veil root CA ({trust_domain})"),
            ROOT_LIFETIME,
            None,
        )?;
        let key = zeroize::Zeroizing::new(root.issuer.key().serialize_pem());
        Ok((root.cert_pem, key))
    }

    /// Uses an existing root (certificate and key, PEM) and makes a new intermediate under it.
    pub fn import(
        trust_domain: &str,
        root_cert_pem: &str,
        root_key_pem: &str,
        leaf_lifetime: Duration,
    ) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(root_key_pem).map_err(|e| CaError::Import(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(root_cert_pem, key)
            .map_err(|e| CaError::Import(e.to_string()))?;
        let root = Authority {
            cert_pem: root_cert_pem.to_string(),
            issuer,
        };
        Self::with_root(trust_domain, root, leaf_lifetime)
    }

    fn with_root(
        trust_domain: &str,
        root: Authority,
        leaf_lifetime: Duration,
    ) -> Result<Self, CaError> {
        let intermediate = new_authority(
            &format!("Veil intermediate CA ({trust_domain})"),
            INTERMEDIATE_LIFETIME,
            Some(&root.issuer),
        )?;
        Ok(Self {
            trust_domain: trust_domain.into(),
            roots: vec![root.cert_pem.clone()],
            root,
            intermediate,
            leaf_lifetime,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Every root a peer should trust now (PEM), oldest first.
    pub fn trust_bundle(&self) -> &[String] {
        &self.roots
    }

    /// The root that signs now (PEM).
    pub fn root_pem(&self) -> &str {
        &self.root.cert_pem
    }

    /// Starts a root rotation: a new root and intermediate sign from now on;
    /// the old roots stay in the bundle until [`Self::retire_previous_roots`],
    /// so certificates already issued keep verifying while leaves are re-issued.
    pub fn rotate_root(&mut self) -> Result<(), CaError> {
        let root = new_authority(
            &format!("Veil root CA ({})", self.trust_domain),
            ROOT_LIFETIME,
            None,
        )?;
        self.intermediate = new_authority(
            &format!("Veil intermediate CA ({})", self.trust_domain),
            INTERMEDIATE_LIFETIME,
            Some(&root.issuer),
        )?;
        self.roots.push(root.cert_pem.clone());
        self.root = root;
        Ok(())
    }

    /// Ends a rotation: only the current root stays trusted.
    pub fn retire_previous_roots(&mut self) {
        self.roots = vec![self.root.cert_pem.clone()];
    }

    /// Signs `csr_pem` for `identity`, valid from now for the default lifetime.
    pub fn sign(&self, csr_pem: &str, identity: &SpiffeId) -> Result<IssuedCertificate, CaError> {
        let now = SystemTime::now();
        self.sign_valid(
            csr_pem,
            identity,
            now - ISSUE_BACKDATE,
            now + self.leaf_lifetime,
        )
    }

    /// Signs with an explicit validity window (for renewals that must not
    /// outlive their issuer, and for tests of expiry handling).
    pub fn sign_valid(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCertificate, CaError> {
        if identity.trust_domain() != self.trust_domain {
            return Err(CaError::WrongTrustDomain {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::Csr)?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::WrongKeyType);
        }
        let wanted = identity.to_string();
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [wanted.clone()] {
            return Err(CaError::WrongIdentity {
                asked: asked.join(", "),
                expected: wanted,
            });
        }
        // Only the public key and the identity come from the CSR; every
        // other property of the certificate is the CA's decision.
        let mut params = CertificateParams::default();
        params.subject_alt_names = csr.params.subject_alt_names.clone();
        // The identity is the URI SAN; the subject only names the trust domain.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, self.trust_domain.clone());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial: [u8; 16] = rand::random();
        let mut serial = serial.to_vec();
        // Positive and without a leading zero byte, so the DER encoding keeps
        // all 16 bytes and the hex serial matches what peers read back.
        serial[0] = serial[0] % 0x7f + 1;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        let leaf = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.intermediate.issuer)
        .map_err(CaError::Sign)?;
        Ok(IssuedCertificate {
            identity: identity.clone(),
            chain_pem: format!("{}{}", leaf.pem(), self.intermediate.cert_pem),
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
            not_before: truncate_to_seconds(not_before),
            not_after: truncate_to_seconds(not_after),
        })
    }
}

fn truncate_to_seconds(time: SystemTime) -> SystemTime {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs())
}

/// A CA certificate and key: self-signed when `parent` is `None`.
fn new_authority(
    name: &str,
    lifetime: Duration,
    parent: Option<&Issuer<'static, KeyPair>>,
) -> Result<Authority, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(match parent {
        None => BasicConstraints::Unconstrained,
        Some(_) => BasicConstraints::Constrained(0),
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = parent.is_some();
    let now = SystemTime::now();
    params.not_before = OffsetDateTime::from(now - ISSUE_BACKDATE);
    params.not_after = OffsetDateTime::from(now + lifetime);
    let cert = match parent {
        None => params.self_signed(&key),
        Some(issuer) => params.signed_by(&key, issuer),
    }
    .map_err(CaError::Sign)?;
    Ok(Authority {
        cert_pem: cert.pem(),
        issuer: Issuer::new(params, key),
    })
}
