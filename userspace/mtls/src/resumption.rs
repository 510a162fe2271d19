//! TLS 1.3 session resumption between agents.
//!
//! A resumed handshake skips both certificate signatures and their
//! verification (about half of a new connection's handshake CPU): the client
//! presents a ticket from an earlier session with the same server name.
//! Tickets are stateless — the session sealed with keys that exist only in
//! this agent's memory and rotate (rustls's ring `Ticketer`) — and are sent
//! only to clients that ask for them with an RFC 9149 ticket request, the
//! agents' clients, which also offer [`ALPN_PROTOCOL`] and so know to read
//! the ticket before the kernel takes the session.
//!
//! Revocation still wins over a ticket, twice over:
//! - each ticket carries the revocation list's version when it was made;
//!   after any revocation the server declines older tickets, so the peers
//!   fall back to a full handshake, whose verifier refuses a revoked
//!   certificate with a TLS alert that names the reason;
//! - on a resumed session both sides check the peer chain rustls restores,
//!   as a full handshake would ([`TrustState::check_resumed`]), which also
//!   catches expiry and trust roots that changed since.

use std::sync::Arc;

use rustls::{ServerConfig, server::ProducesTickets};

use crate::{settings::ALPN_PROTOCOL, verifier::TrustState};

/// Session tickets a server sends per handshake, and a client asks for.
pub(crate) const TICKETS_PER_HANDSHAKE: u8 = 1;

/// Makes `config` issue and accept tickets, bound to `trust`'s revocations.
pub(crate) fn enable(
    config: &mut ServerConfig,
    trust: Arc<TrustState>,
) -> Result<(), rustls::Error> {
    config.ticketer = Arc::new(RevocationBoundTicketer {
        sealer: rustls::crypto::ring::Ticketer::new()?,
        trust,
    });
    // None for clients that do not ask (an old agent, openssl s_client).
    config.send_tls13_tickets = 0;
    config.max_tls13_tickets = usize::from(TICKETS_PER_HANDSHAKE);
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    Ok(())
}

/// Seals the revocation list's version into every ticket and opens only
/// tickets of the current version.
#[derive(Debug)]
struct RevocationBoundTicketer {
    sealer: Arc<dyn ProducesTickets>,
    trust: Arc<TrustState>,
}

impl RevocationBoundTicketer {
    fn version(&self) -> Option<[u8; 8]> {
        let revoked = self.trust.revoked.read().ok()?;
        Some(revoked.version().to_be_bytes())
    }
}

impl ProducesTickets for RevocationBoundTicketer {
    fn enabled(&self) -> bool {
        self.sealer.enabled()
    }

    fn lifetime(&self) -> u32 {
        self.sealer.lifetime()
    }

    fn encrypt(&self, session: &[u8]) -> Option<Vec<u8>> {
        let mut plain = self.version()?.to_vec();
        plain.extend_from_slice(session);
        self.sealer.encrypt(&plain)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        let plain = self.sealer.decrypt(ticket)?;
        let (version, session) = plain.split_at_checked(8)?;
        (version == self.version()?.as_slice()).then(|| session.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_until_the_next_revocation() {
        let trust = Arc::new(TrustState::default());
        let ticketer = RevocationBoundTicketer {
            sealer: rustls::crypto::ring::Ticketer::new().unwrap(),
            trust: Arc::clone(&trust),
        };
        let ticket = ticketer.encrypt(b"session state").unwrap();
        assert_eq!(ticketer.decrypt(&ticket).unwrap(), b"session state");
        assert_eq!(ticketer.decrypt(b"forged").as_deref(), None);
        trust.revoked.write().unwrap().revoke_serial("0a");
        assert_eq!(
            ticketer.decrypt(&ticket),
            None,
            "made before the revocation"
        );
        let fresh = ticketer.encrypt(b"later").unwrap();
        assert_eq!(ticketer.decrypt(&fresh).unwrap(), b"later");
    }
}
