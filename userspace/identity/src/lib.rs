//! Workload identity for Veil.
//!
//! Every meshed workload gets an ECDSA P-256 certificate carrying its SPIFFE
//! ID (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`). The
//! node agent generates each workload's private key locally — keys never
//! leave the node, are stored 0600 and never printed — and sends a CSR; the
//! local CA ([`ca`]) signs it. Server names for ingress and external services
//! can come from an ACME CA instead ([`acme`]); public ACME CAs stopped
//! issuing client-auth certificates in 2026, so mesh identities always come
//! from the local CA. [`renewal`] decides when to renew and how to back off; [`revocation`]
//! holds what verifiers refuse.

pub mod acme;
pub mod ca;
pub mod keys;
pub mod renewal;
pub mod revocation;
pub mod spiffe;
pub mod verify;

pub use ca::{CertificateAuthority, IssuedCertificate};
pub use keys::WorkloadKey;
pub use revocation::RevocationList;
pub use spiffe::SpiffeId;
