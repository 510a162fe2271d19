//! rustls certificate verifiers that speak SPIFFE.
//!
//! Workload certificates carry a URI SAN and no DNS name, so rustls's WebPKI
//! verifiers (which check host names) do not fit. These delegate chain,
//! validity, identity and revocation checks to `veil_identity::verify` — one
//! implementation for every place that checks a peer — and handshake
//! signatures to rustls's own verification with the configured algorithms.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    CertificateError, Connection, DigitallySignedStruct, DistinguishedName, Error, HandshakeKind,
    OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use veil_identity::{
    RevocationList, SpiffeId,
    verify::{ChainCache, Expected, Rejection, verify_chain_der_cached},
};

/// Whom a verifier accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// Exactly this workload.
    Identity(SpiffeId),
    /// Any workload of the trust domain.
    TrustDomain(String),
}

/// The trust bundle and revocation list, shared by every connection and
/// updated in place when roots rotate or a revocation arrives.
#[derive(Debug, Default)]
pub struct TrustState {
    pub roots: RwLock<Vec<CertificateDer<'static>>>,
    pub revoked: RwLock<RevocationList>,
    /// Chains whose signatures were already verified against these roots.
    pub verified_chains: ChainCache,
}

/// Verifies a peer agent's workload certificate.
#[derive(Debug)]
pub struct PeerVerifier {
    trust: Arc<TrustState>,
    expected: ExpectedPeer,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    pub fn new(
        trust: Arc<TrustState>,
        expected: ExpectedPeer,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Self {
        Self {
            trust,
            expected,
            algorithms,
        }
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, Error> {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        self.trust
            .verify(&self.expected, end_entity, intermediates, now)
    }
}

impl TrustState {
    /// Checks a peer's chain: signatures up to a root (cached), validity
    /// period, SPIFFE ID and revocation.
    pub fn verify(
        &self,
        expected: &ExpectedPeer,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<SpiffeId, Error> {
        let chain: Vec<&[u8]> = std::iter::once(end_entity.as_ref())
            .chain(intermediates.iter().map(|c| c.as_ref()))
            .collect();
        let roots = self.roots.read().map_err(|_| poisoned())?;
        let roots: Vec<&[u8]> = roots.iter().map(|c| c.as_ref()).collect();
        let revoked = self.revoked.read().map_err(|_| poisoned())?;
        let expected = match expected {
            ExpectedPeer::Identity(id) => Expected::Identity(id),
            ExpectedPeer::TrustDomain(domain) => Expected::TrustDomain(domain),
        };
        verify_chain_der_cached(
            &chain,
            &roots,
            &expected,
            now,
            &revoked,
            &self.verified_chains,
        )
        .map_err(rejected)
    }

    /// A resumed TLS 1.3 handshake verifies no certificate: the peer proved
    /// it holds the secret of an earlier session, and rustls restores that
    /// session's peer chain. This checks the restored chain as a full
    /// handshake would, now — so a certificate revoked, expired or no longer
    /// under a trusted root since that session is refused on resumption too.
    /// A full handshake passes (its verifier already checked).
    pub fn check_resumed(
        &self,
        connection: &Connection,
        expected: &ExpectedPeer,
    ) -> Result<(), Error> {
        if connection.handshake_kind() != Some(HandshakeKind::Resumed) {
            return Ok(());
        }
        let Some((end_entity, intermediates)) = connection
            .peer_certificates()
            .and_then(|chain| chain.split_first())
        else {
            return Err(Error::NoCertificatesPresented);
        };
        self.verify(expected, end_entity, intermediates, SystemTime::now())
            .map(drop)
    }
}

fn poisoned() -> Error {
    Error::General("trust state lock poisoned".into())
}

/// Turns a named rejection into the rustls error that carries it (so the
/// reason reaches logs on both sides as a TLS alert and an error message).
fn rejected(rejection: Rejection) -> Error {
    let certificate_error = match rejection {
        Rejection::Expired { .. } => CertificateError::Expired,
        Rejection::NotYetValid { .. } => CertificateError::NotValidYet,
        Rejection::Revoked { .. } | Rejection::IdentityRevoked { .. } => CertificateError::Revoked,
        Rejection::UnknownCa => CertificateError::UnknownIssuer,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    Error::InvalidCertificate(certificate_error)
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.verify(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.verify(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
