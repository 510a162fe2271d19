//! Why the mesh refused a connection: one reason per failure, each with a
//! short metric label and a message that says what to check.

use veil_mtls::{handshake::HandshakeError, session::SessionError};

use super::sockets::SocketError;

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("no inventory accepted yet: the agent does not know the mesh's pods")]
    NoInventory,
    #[error("the connection is not IPv4; the mesh carries IPv4 only")]
    NotIpv4,
    #[error("source {0} is not a meshed pod on this node (check its [pods.mesh] entry)")]
    SourceNotMeshed(String),
    #[error("destination {0} is not a meshed pod on another node")]
    DestinationNotMeshed(String),
    #[error("cannot get a workload certificate: {0}")]
    Certificate(String),
    #[error("peer agent at {address} is unreachable: {source}")]
    PeerUnreachable {
        address: String,
        source: std::io::Error,
    },
    #[error("mTLS handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("the peer presented no usable workload identity: {0}")]
    PeerIdentity(String),
    #[error("the preface names {preface} but the TLS server name was {sni}")]
    SniMismatch { preface: String, sni: String },
    #[error(
        "source address {address} does not belong to the peer's identity {identity} on node {node}"
    )]
    SourceMismatch {
        address: String,
        identity: String,
        node: String,
    },
    #[error("denied by policy: {0}")]
    Denied(String),
    #[error("the peer's certificate was revoked: {0}")]
    Revoked(String),
    #[error("destination {destination} is now {now}, not {was} whose agent this session reached")]
    DestinationChanged {
        destination: String,
        was: String,
        now: String,
    },
    #[error("cannot reach the destination pod: {0}")]
    DestinationUnreachable(#[from] SocketError),
    #[error("cannot set up the session: {0}")]
    Session(#[from] SessionError),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent is stopping")]
    AgentStopping,
    #[error(
        "the peer did not finish the handshake and preface within {0:?} (mesh.handshake_timeout)"
    )]
    HandshakeDeadline(std::time::Duration),
    #[error(
        "the allow rules admit {0} again (they changed while it connected): the next connection goes through"
    )]
    SameNodeRulesChanged(String),
}

impl Refusal {
    /// The `result` label of `veil_mesh_connections_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoInventory => "no_inventory",
            Self::NotIpv4 => "not_ipv4",
            Self::SourceNotMeshed(_) => "source_not_meshed",
            Self::DestinationNotMeshed(_) => "destination_not_meshed",
            Self::Certificate(_) => "certificate_unavailable",
            Self::PeerUnreachable { .. } => "peer_unreachable",
            Self::Handshake(HandshakeError::Tls(_)) => "tls_refused",
            Self::Handshake(HandshakeError::Preface(_)) => "bad_preface",
            Self::Handshake(HandshakeError::NotTls(_)) => "not_tls",
            Self::Handshake(_) => "handshake_failed",
            Self::PeerIdentity(_) => "peer_identity_invalid",
            Self::SniMismatch { .. } => "sni_mismatch",
            Self::SourceMismatch { .. } => "source_mismatch",
            Self::Denied(_) => "denied",
            Self::Revoked(_) => "revoked",
            Self::DestinationChanged { .. } => "destination_changed",
            Self::DestinationUnreachable(_) => "destination_unreachable",
            Self::Session(_) => "session_failed",
            Self::Io(_) => "io_error",
            Self::AgentStopping => "agent_stopping",
            Self::HandshakeDeadline(_) => "handshake_deadline",
            Self::SameNodeRulesChanged(_) => "rules_changed",
        }
    }
}
