//! Fixtures shared by the session and kTLS tests: a CA, two workloads and an
//! established session pair over loopback.

use std::{
    net::{TcpListener, TcpStream},
    sync::Arc,
    time::Duration,
};

use rustls::{
    ClientConfig, ClientConnection, Connection, HandshakeKind, ServerConfig, ServerConnection,
    pki_types::ServerName,
};
use veil_identity::{CertificateAuthority, SpiffeId, WorkloadKey, ca::DEFAULT_LEAF_LIFETIME};
use veil_mtls::{
    Preface, TlsSettings, WorkloadCredentials, handshake,
    session::{KernelTls, Session},
    verifier::{ExpectedPeer, TrustState},
};

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const SIXTEEN_MIB: usize = 16 << 20;

/// The byte at `offset` of every test stream.
pub fn pattern(offset: usize) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 11)) as u8
}

/// A server and a client workload of one CA, with configurations that keep
/// their session tickets across connections (as the agents' do).
pub struct Peers {
    trust: Arc<TrustState>,
    server_id: SpiffeId,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl Peers {
    pub fn new(settings: &TlsSettings) -> Self {
        let ca = CertificateAuthority::generate(TRUST_DOMAIN, DEFAULT_LEAF_LIFETIME).unwrap();
        let trust = Arc::new(TrustState::default());
        *trust.roots.write().unwrap() = ca
            .trust_bundle()
            .iter()
            .map(|pem| {
                use rustls::pki_types::pem::PemObject;
                rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
            })
            .collect();
        let issue = |sa: &str| {
            let id = SpiffeId::new(TRUST_DOMAIN, "shop", sa).unwrap();
            let key = WorkloadKey::generate().unwrap();
            let issued = ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
            (id, WorkloadCredentials::new(&issued, &key).unwrap())
        };
        let (server_id, server_creds) = issue("checkout");
        let (_, client_creds) = issue("cart");
        let server = settings
            .server_config(&server_creds, Arc::clone(&trust), TRUST_DOMAIN)
            .unwrap();
        let client = settings
            .client_config(
                &client_creds,
                Arc::clone(&trust),
                ExpectedPeer::Identity(server_id.clone()),
            )
            .unwrap();
        Self {
            trust,
            server_id,
            server: Arc::new(server),
            client: Arc::new(client),
        }
    }

    /// A client session ready at once, whether its handshake was resumed,
    /// and the server's session still being made on a thread that waits
    /// `server_delay` before its handshake: bytes the client sends right
    /// away are queued before the server reads anything.
    pub fn connect(
        &self,
        server_delay: Duration,
    ) -> (Session, HandshakeKind, std::thread::JoinHandle<Session>) {
        self.connect_placed(server_delay, Placement::Auto, Placement::Auto)
    }

    /// [`Self::connect`] with each side's session placed as asked.
    pub fn connect_placed(
        &self,
        server_delay: Duration,
        client_placement: Placement,
        server_placement: Placement,
    ) -> (Session, HandshakeKind, std::thread::JoinHandle<Session>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        // The agents' own path: handshake and preface read record by record,
        // then into the kernel if it has TLS.
        let (server_config, trust) = (Arc::clone(&self.server), Arc::clone(&self.trust));
        let server = std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().unwrap();
            std::thread::sleep(server_delay);
            let connection = ServerConnection::new(server_config).unwrap();
            let (connection, preface) =
                handshake::server(connection, &mut tcp, &trust, TRUST_DOMAIN).unwrap();
            assert_eq!(preface, test_preface());
            server_placement.session(connection, tcp)
        });
        let mut tcp = TcpStream::connect(address).unwrap();
        let connection = ClientConnection::new(
            Arc::clone(&self.client),
            ServerName::try_from("veil.invalid").unwrap(),
        )
        .unwrap();
        let expected = ExpectedPeer::Identity(self.server_id.clone());
        let connection = handshake::client(
            connection,
            &mut tcp,
            &test_preface(),
            &self.trust,
            &expected,
        )
        .unwrap();
        let kind = connection.handshake_kind().unwrap();
        let client = client_placement.session(connection, tcp);
        (client, kind, server)
    }
}

/// Where a fixture's session runs.
#[allow(
    dead_code,
    reason = "session_relay.rs uses it; ktls_vm.rs includes this module too"
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// As the agents place it: in the kernel where it has TLS.
    Auto,
    /// Kept in rustls even where the kernel has TLS: the other end of a
    /// session between an agent with kTLS and one without.
    Userspace,
}

impl Placement {
    fn session(self, mut connection: Connection, mut tcp: TcpStream) -> Session {
        match self {
            Self::Auto => Session::from_handshaken(connection, tcp, KernelTls::Auto).unwrap(),
            Self::Userspace => {
                handshake::send_pending(&mut connection, &mut tcp).unwrap();
                Session::Userspace(Box::new(connection), tcp)
            }
        }
    }
}

/// Sends `bytes` through `session` as data, then ends its TCP stream with a
/// FIN and no close_notify — what a peer agent that died, or an attacker
/// forging a FIN, leaves. Returns the TCP socket, to be dropped later.
#[allow(
    dead_code,
    reason = "session_relay.rs uses it; ktls_vm.rs includes this module too"
)]
pub fn cut_after(session: Session, bytes: &[u8]) -> TcpStream {
    use std::io::Write;
    let tcp = match session {
        Session::Kernel(tcp) => {
            (&tcp).write_all(bytes).unwrap();
            tcp
        }
        Session::Userspace(mut connection, mut tcp) => {
            connection.writer().write_all(bytes).unwrap();
            while connection.wants_write() {
                connection.write_tls(&mut tcp).unwrap();
            }
            tcp
        }
    };
    tcp.shutdown(std::net::Shutdown::Write).unwrap();
    tcp
}

/// A client session ready at once, and the server's session still being
/// made (see [`Peers::connect`]), between two fresh workloads.
pub fn session_pair_with_server_delay(
    settings: &TlsSettings,
    server_delay: Duration,
) -> (Session, std::thread::JoinHandle<Session>) {
    let (client, _, server) = Peers::new(settings).connect(server_delay);
    (client, server)
}

/// The preface every fixture session carries.
pub fn test_preface() -> Preface {
    Preface {
        original_destination: "198.19.2.1:8080".parse().unwrap(),
        source: "198.19.1.1:40000".parse().unwrap(),
    }
}

/// Two sessions (client side, server side) established over loopback with
/// `settings`. Both handshakes finish before this returns.
pub fn session_pair(settings: &TlsSettings) -> (Session, Session) {
    let (client, server) = session_pair_with_server_delay(settings, Duration::ZERO);
    (client, server.join().unwrap())
}
