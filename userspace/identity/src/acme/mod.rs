//! Certificates for server names from an ACME CA (instant-acme).
//!
//! For ingress and external services only: public ACME CAs stopped issuing
//! client-auth certificates in 2026, so mesh identities (which need both TLS
//! roles) always come from the local CA. The private key is made here, on the
//! node; only the CSR goes to the CA.
//!
//! - [`challenge`]: proving control of the names: HTTP-01, served by
//!   [`Http01Responder`] on the port the CA probes (80 in production), or
//!   DNS-01 through a [`Dns01Hook`] that publishes the TXT record.
//! - [`order`]: one order (account, challenges, P-256 CSR, chain), optionally
//!   replacing an earlier certificate (RFC 9773 `replaces`).
//! - [`certificate`]: what a chain says that renewal needs (names, validity,
//!   serial, the ARI certificate identifier).
//! - [`store`]: the chains, keys and the account on disk.
//! - [`renewal`]: when to renew: the CA's ARI window, else 2/3 of the lifetime.
//! - [`renewer`]: the long-running [`AcmeRenewer`] that keeps a set of
//!   certificates obtained, stored and renewed, and reports their state.

pub mod certificate;
pub mod challenge;
pub mod order;
pub mod renewal;
pub mod renewer;
pub mod store;

use std::{net::SocketAddr, path::PathBuf};

use instant_acme::{AuthorizationStatus, ChallengeType, OrderStatus};

pub use certificate::CertificateInfo;
pub use challenge::{ChallengeMethod, CommandDns01Hook, Dns01Hook, Http01Responder};
pub use order::{AcmeCertificate, obtain};
pub use renewal::{AriBounds, DecisionSource, RenewalPlan};
pub use renewer::{
    AcmeRenewer, CertificateSpec, CertificateStatus, Challenge, RenewerSettings, RenewerState,
};
pub use store::{CertificateStore, StoreError, StoredCertificate};

use crate::keys::KeyError;

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME CA at {url}: {source}")]
    Protocol {
        url: String,
        source: instant_acme::Error,
    },
    #[error("the ACME CA offers no {0:?} challenge for {1}")]
    NoChallenge(ChallengeType, String),
    #[error("DNS-01 hook failed for {record}: {reason}")]
    Dns01 { record: String, reason: String },
    #[error("order ended as {0:?} instead of ready: the CA could not validate the challenges")]
    NotReady(OrderStatus),
    #[error("authorization for {0} is {1:?}")]
    Authorization(String, AuthorizationStatus),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot serve HTTP-01 on {address}: {source}")]
    Http01Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("the ACME CA returned a chain that cannot be used: {0}")]
    Chain(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("certificate {name:?}: {reason}")]
    Spec { name: String, reason: String },
}

/// Where to get certificates.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The directory URL (e.g. Let's Encrypt's, or a private CA's).
    pub directory_url: String,
    /// PEM root to trust for the CA's own HTTPS (private ACME CAs); the
    /// system roots otherwise.
    pub server_root: Option<PathBuf>,
    /// Contact URIs for the account (`mailto:…`).
    pub contact: Vec<String>,
}
