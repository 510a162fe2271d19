//! Mutual TLS between Veil's node agents.
//!
//! The client agent dials the peer agent on :15008 presenting the *source*
//! workload's certificate; the server presents the *destination* workload's.
//! Both sides check the chain against the trust bundle and the SPIFFE ID:
//! the client insists on exactly the identity its endpoint table expects, the
//! server accepts any workload of the trust domain and hands the verified
//! identity to authorization. Inside the TLS stream, a small versioned
//! [`preface`] carries the original destination.
//!
//! TLS 1.3 only, ECDSA P-256 certificates; cipher suites and key-exchange
//! groups are chosen in one place, [`settings::TlsSettings`].

pub mod abort;
pub mod control_records;
pub mod handshake;
pub mod ktls;
pub mod limits;
pub mod preface;
pub mod relay;
pub mod resumption;
pub mod session;
pub mod settings;
pub mod verifier;
pub mod workers;

pub use preface::Preface;
pub use settings::{TlsSettings, WorkloadCredentials};
