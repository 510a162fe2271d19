//! Established sessions follow the rules that let them in.
//!
//! Authorization, the pods' identities and revocation are checked when a
//! connection is set up. Rules change and certificates get revoked while
//! connections run, and a connection must not outlive the decision that
//! allowed it: an allow rule removed, a pod that became another workload, a
//! compromised identity revoked. (Istio's ztunnel does the same.)
//!
//! Every relayed session is registered here with what it was allowed on:
//! direction, the two pods, the peer agent and the peer's certificate. When
//! the inventory changes (pods, policy) or a revocation arrives, every
//! session is checked again with the same rules as at its handshake; one no
//! longer allowed is reset at both ends ([`veil_mtls::abort`]), counted in
//! `veil_mesh_sessions_reset_total{direction,reason}`, logged with the
//! reason and recorded in `veilctl flows` as `reset: <reason>`.
//!
//! A session registers after its handshake and is checked once more right
//! then, so a change that lands between the two is not missed.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use veil_identity::verify::LeafFacts;
use veil_mtls::abort::RelayAbort;

use super::{metrics::Direction, refusal::Refusal};

/// One relayed session, as it was allowed.
#[derive(Debug)]
pub struct LiveSession {
    pub direction: Direction,
    /// The client pod.
    pub source: SocketAddrV4,
    /// The server pod, as the client dialled it.
    pub destination: SocketAddrV4,
    /// The other node's agent.
    pub peer_node: Ipv4Addr,
    /// The certificate the other agent presented.
    pub peer: LeafFacts,
    abort: RelayAbort,
    /// Why the session was reset, once it has been.
    reset_because: OnceLock<Reset>,
}

/// Why a session was reset: the metric label and the full reason.
#[derive(Debug, Clone)]
pub struct Reset {
    pub label: &'static str,
    pub reason: String,
}

impl LiveSession {
    pub fn new(
        direction: Direction,
        source: SocketAddrV4,
        destination: SocketAddrV4,
        peer_node: Ipv4Addr,
        peer: LeafFacts,
        abort: RelayAbort,
    ) -> Self {
        Self {
            direction,
            source,
            destination,
            peer_node,
            peer,
            abort,
            reset_because: OnceLock::new(),
        }
    }

    pub fn abort_handle(&self) -> &RelayAbort {
        &self.abort
    }

    /// Resets both ends; `false` if it was reset already.
    pub fn reset(&self, refusal: &Refusal) -> bool {
        let first = self
            .reset_because
            .set(Reset {
                label: refusal.label(),
                reason: refusal.to_string(),
            })
            .is_ok();
        if first {
            self.abort.abort();
        }
        first
    }

    pub fn reset_because(&self) -> Option<&Reset> {
        self.reset_because.get()
    }
}

/// The sessions being relayed now.
#[derive(Debug, Default)]
pub struct LiveSessions {
    next_id: AtomicU64,
    sessions: Mutex<HashMap<u64, Arc<LiveSession>>>,
}

/// A registered session; dropping it (when the relay has returned)
/// unregisters it and closes the abort handle's descriptors.
pub struct Registered<'a> {
    sessions: &'a LiveSessions,
    id: u64,
    pub session: Arc<LiveSession>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.sessions.lock().remove(&self.id);
    }
}

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LiveSession>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, session: LiveSession) -> Registered<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(session);
        self.lock().insert(id, Arc::clone(&session));
        Registered {
            sessions: self,
            id,
            session,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resets every session `allowed` refuses now; returns those it reset,
    /// with the reason. `allowed` runs without the registry's lock held.
    pub fn reset_unless(
        &self,
        allowed: impl Fn(&LiveSession) -> Result<(), Refusal>,
    ) -> Vec<(Arc<LiveSession>, Refusal)> {
        let sessions: Vec<Arc<LiveSession>> = self.lock().values().cloned().collect();
        sessions
            .into_iter()
            .filter_map(|session| {
                let refusal = allowed(&session).err()?;
                session.reset(&refusal).then_some((session, refusal))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{ErrorKind, Read},
        net::TcpStream,
        time::Duration,
    };

    use veil_identity::{CertificateAuthority, SpiffeId, WorkloadKey, ca::DEFAULT_LEAF_LIFETIME};
    use veil_mtls::session::Session;

    use rustls::pki_types::pem::PemObject;

    use super::*;

    fn pair() -> (TcpStream, TcpStream) {
        veil_testbed::traffic::loopback_pair().unwrap()
    }

    fn facts(service_account: &str) -> LeafFacts {
        let ca = CertificateAuthority::generate("td", DEFAULT_LEAF_LIFETIME).unwrap();
        let id = SpiffeId::new("td", "shop", service_account).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let issued = ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(issued.chain_pem.as_bytes()).unwrap();
        LeafFacts::of(&der).unwrap()
    }

    /// A registered session over loopback sockets: (session, the pod's end).
    fn session<'a>(
        sessions: &'a LiveSessions,
        service_account: &str,
    ) -> (Registered<'a>, TcpStream) {
        let (plain, pod) = pair();
        let (tls, _agent) = pair();
        let abort = Session::Kernel(tls).abort_handle(&plain).unwrap();
        let session = LiveSession::new(
            Direction::Inbound,
            "198.18.1.1:40000".parse().unwrap(),
            "198.18.2.1:80".parse().unwrap(),
            Ipv4Addr::new(198, 18, 0, 2),
            facts(service_account),
            abort,
        );
        (sessions.register(session), pod)
    }

    #[test]
    fn only_sessions_no_longer_allowed_are_reset_and_only_once() {
        let sessions = LiveSessions::default();
        let (cart, mut cart_pod) = session(&sessions, "cart");
        let (payments, _payments_pod) = session(&sessions, "payments");
        assert_eq!(sessions.len(), 2);
        let deny_cart = |session: &LiveSession| {
            if session.peer.identity.service_account() == "cart" {
                Err(Refusal::Denied("cart may not".into()))
            } else {
                Ok(())
            }
        };
        let reset = sessions.reset_unless(deny_cart);
        assert_eq!(reset.len(), 1);
        assert_eq!(reset[0].1.label(), "denied");
        assert_eq!(cart.session.reset_because().unwrap().label, "denied");
        assert!(payments.session.reset_because().is_none());
        assert!(cart.session.abort_handle().is_aborted());
        assert!(!payments.session.abort_handle().is_aborted());
        cart_pod
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let error = cart_pod.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ConnectionReset);
        // Still refused at the next change: not reset (or counted) twice.
        assert!(sessions.reset_unless(deny_cart).is_empty());
        drop(cart);
        assert_eq!(sessions.len(), 1, "a finished relay unregisters");
        drop(payments);
        assert!(sessions.is_empty());
    }
}
