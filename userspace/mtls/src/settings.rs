//! TLS settings in one place, and the rustls configurations built from them.

use std::sync::Arc;

use rustls::{
    ClientConfig, ServerConfig, SupportedCipherSuite,
    client::TicketRequest,
    crypto::{CryptoProvider, SupportedKxGroup, ring},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject},
    server::ResolvesServerCert,
    sign::CertifiedKey,
    version::TLS13,
};
use veil_identity::{IssuedCertificate, WorkloadKey};

use crate::{
    resumption,
    verifier::{ExpectedPeer, PeerVerifier, TrustState},
};

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the workload's certificate chain is not valid PEM: {0}")]
    Chain(String),
}

/// The ALPN protocol agents speak on :15008. A server that selects it sends
/// exactly one session ticket on every handshake, full or resumed, right
/// after it reads the client's Finished and before any application byte; a
/// client that sees it selected knows that ticket comes first (see
/// [`crate::handshake::receive_ticket`]). Clients that do not offer it (and
/// no RFC 9149 ticket request) get no ticket. See [`crate::resumption`].
pub const ALPN_PROTOCOL: &[u8] = b"veil/1";

/// Cipher suites and key-exchange groups: the only place they are chosen.
/// TLS 1.3 only; certificates are ECDSA P-256.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cipher_suites: Vec<SupportedCipherSuite>,
    pub kx_groups: Vec<&'static dyn SupportedKxGroup>,
}

impl Default for TlsSettings {
    /// AES-128-GCM first (hardware AES, and what kTLS offloads everywhere),
    /// then AES-256-GCM and ChaCha20-Poly1305; X25519, then P-256.
    fn default() -> Self {
        Self {
            cipher_suites: vec![
                ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
                ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
                ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            ],
            kx_groups: vec![ring::kx_group::X25519, ring::kx_group::SECP256R1],
        }
    }
}

impl TlsSettings {
    pub fn provider(&self) -> Arc<CryptoProvider> {
        Arc::new(CryptoProvider {
            cipher_suites: self.cipher_suites.clone(),
            kx_groups: self.kx_groups.clone(),
            ..ring::default_provider()
        })
    }

    /// The server side of :15008: presents `credentials`, requires a client
    /// certificate of the trust domain.
    pub fn server_config(
        &self,
        credentials: &WorkloadCredentials,
        trust: Arc<TrustState>,
        trust_domain: &str,
    ) -> Result<ServerConfig, SettingsError> {
        let provider = self.provider();
        let verifier = PeerVerifier::new(
            Arc::clone(&trust),
            ExpectedPeer::TrustDomain(trust_domain.into()),
            provider.signature_verification_algorithms,
        );
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(credentials.chain.clone(), credentials.key.clone_key())?;
        // The keys go to the kernel (kTLS) after the handshake.
        config.enable_secret_extraction = true;
        resumption::enable(&mut config, trust)?;
        Ok(config)
    }

    /// The server side of :15008 for many workloads: `resolver` picks the
    /// destination workload's certificate by SNI.
    pub fn server_config_with_resolver(
        &self,
        resolver: Arc<dyn ResolvesServerCert>,
        trust: Arc<TrustState>,
        trust_domain: &str,
    ) -> Result<ServerConfig, SettingsError> {
        let provider = self.provider();
        let verifier = PeerVerifier::new(
            Arc::clone(&trust),
            ExpectedPeer::TrustDomain(trust_domain.into()),
            provider.signature_verification_algorithms,
        );
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(resolver);
        config.enable_secret_extraction = true;
        resumption::enable(&mut config, trust)?;
        Ok(config)
    }

    /// The client side: presents `credentials`, accepts only `expected` as the server.
    pub fn client_config(
        &self,
        credentials: &WorkloadCredentials,
        trust: Arc<TrustState>,
        expected: ExpectedPeer,
    ) -> Result<ClientConfig, SettingsError> {
        let provider = self.provider();
        let verifier =
            PeerVerifier::new(trust, expected, provider.signature_verification_algorithms);
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(credentials.chain.clone(), credentials.key.clone_key())?;
        config.enable_secret_extraction = true;
        // Resumption: the default in-memory store keeps tickets per server
        // name (a destination pod), inside this configuration, which the
        // agent keeps per (source certificate, destination identity).
        config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
        config.send_ticket_request = Some(TicketRequest {
            new_session_count: resumption::TICKETS_PER_HANDSHAKE,
            resumption_count: resumption::TICKETS_PER_HANDSHAKE,
        });
        Ok(config)
    }
}

/// A workload's certificate chain and private key, ready for rustls.
pub struct WorkloadCredentials {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl WorkloadCredentials {
    pub fn new(issued: &IssuedCertificate, key: &WorkloadKey) -> Result<Self, SettingsError> {
        let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SettingsError::Chain(e.to_string()))?;
        let der = key.pkcs8_der();
        Ok(Self {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec())),
        })
    }
}

impl WorkloadCredentials {
    /// The chain and a signing key, as a server certificate resolver hands them out.
    pub fn certified_key(
        &self,
        settings: &TlsSettings,
    ) -> Result<Arc<CertifiedKey>, SettingsError> {
        let key = settings
            .provider()
            .key_provider
            .load_private_key(self.key.clone_key())?;
        Ok(Arc::new(CertifiedKey::new(self.chain.clone(), key)))
    }
}

impl std::fmt::Debug for WorkloadCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WorkloadCredentials({} certificates, private key redacted)",
            self.chain.len()
        )
    }
}
