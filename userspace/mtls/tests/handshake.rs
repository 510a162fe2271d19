//! Real TLS 1.3 handshakes between a client and a server agent over loopback,
//! with workload certificates from Veil's CA: who is accepted, who is refused
//! and why, and the preface crossing the encrypted stream.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    ClientConnection, ServerConnection, StreamOwned,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use veil_identity::{CertificateAuthority, SpiffeId, WorkloadKey, ca::DEFAULT_LEAF_LIFETIME};
use veil_mtls::{
    Preface, TlsSettings, WorkloadCredentials,
    verifier::{ExpectedPeer, TrustState},
};

const TRUST_DOMAIN: &str = "cluster.local";

struct Mesh {
    ca: CertificateAuthority,
    trust: Arc<TrustState>,
    settings: TlsSettings,
}

impl Mesh {
    fn new() -> Self {
        let ca = CertificateAuthority::generate(TRUST_DOMAIN, DEFAULT_LEAF_LIFETIME).unwrap();
        let trust = Arc::new(TrustState::default());
        *trust.roots.write().unwrap() = ca
            .trust_bundle()
            .iter()
            .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .collect();
        Self {
            ca,
            trust,
            settings: TlsSettings::default(),
        }
    }

    fn workload(&self, sa: &str) -> (SpiffeId, WorkloadCredentials) {
        let id = SpiffeId::new(TRUST_DOMAIN, "shop", sa).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let issued = self.ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
        (id, WorkloadCredentials::new(&issued, &key).unwrap())
    }
}

/// What the server saw: the client's identity and the preface, or its error.
type ServerOutcome = Result<(SpiffeId, Preface), String>;

/// Runs one connection: the server echoes after reading the preface.
fn connect(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
    preface: Preface,
) -> (Result<Vec<u8>, String>, ServerOutcome) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || -> ServerOutcome {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let connection = ServerConnection::new(Arc::new(server)).unwrap();
        let mut tls = StreamOwned::new(connection, tcp);
        let mut header = [0u8; veil_mtls::preface::LENGTH];
        tls.read_exact(&mut header).map_err(|e| e.to_string())?;
        let preface = Preface::decode(&header).map_err(|e| e.to_string())?;
        let peer = tls
            .conn
            .peer_certificates()
            .ok_or("no client certificate")?[0]
            .clone();
        let identity = veil_identity::verify::spiffe_id_of(&peer).map_err(|e| e.to_string())?;
        let mut body = [0u8; 5];
        tls.read_exact(&mut body).map_err(|e| e.to_string())?;
        tls.write_all(&body).map_err(|e| e.to_string())?;
        tls.flush().map_err(|e| e.to_string())?;
        Ok((identity, preface))
    });
    let tcp = TcpStream::connect(address).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let connection = ClientConnection::new(
        Arc::new(client),
        ServerName::try_from("veil.invalid").unwrap(),
    )
    .unwrap();
    let mut tls = StreamOwned::new(connection, tcp);
    let client_result = (|| -> Result<Vec<u8>, String> {
        tls.write_all(&preface.encode())
            .map_err(|e| e.to_string())?;
        tls.write_all(b"hello").map_err(|e| e.to_string())?;
        let mut echo = vec![0u8; 5];
        tls.read_exact(&mut echo).map_err(|e| e.to_string())?;
        Ok(echo)
    })();
    drop(tls);
    (client_result, server.join().unwrap())
}

fn preface() -> Preface {
    Preface {
        original_destination: "198.19.2.1:8080".parse().unwrap(),
        source: "198.19.1.1:40000".parse().unwrap(),
    }
}

#[test]
fn mutual_tls13_with_spiffe_ids_carries_the_preface() {
    let mesh = Mesh::new();
    let (client_id, client_creds) = mesh.workload("cart");
    let (server_id, server_creds) = mesh.workload("checkout");
    let server = mesh
        .settings
        .server_config(&server_creds, Arc::clone(&mesh.trust), TRUST_DOMAIN)
        .unwrap();
    let client = mesh
        .settings
        .client_config(
            &client_creds,
            Arc::clone(&mesh.trust),
            ExpectedPeer::Identity(server_id),
        )
        .unwrap();
    let (client_result, server_result) = connect(server, client, preface());
    assert_eq!(client_result.unwrap(), b"hello");
    let (seen_identity, seen_preface) = server_result.unwrap();
    assert_eq!(
        seen_identity, client_id,
        "the server learns who the client workload is"
    );
    assert_eq!(seen_preface, preface());
}

#[test]
fn the_client_refuses_a_server_with_the_wrong_identity() {
    let mesh = Mesh::new();
    let (_, client_creds) = mesh.workload("cart");
    let (_, impostor_creds) = mesh.workload("impostor");
    let expected = SpiffeId::new(TRUST_DOMAIN, "shop", "checkout").unwrap();
    let server = mesh
        .settings
        .server_config(&impostor_creds, Arc::clone(&mesh.trust), TRUST_DOMAIN)
        .unwrap();
    let client = mesh
        .settings
        .client_config(
            &client_creds,
            Arc::clone(&mesh.trust),
            ExpectedPeer::Identity(expected),
        )
        .unwrap();
    let (client_result, server_result) = connect(server, client, preface());
    let error = client_result.unwrap_err();
    assert!(
        error.contains("WrongIdentity")
            && error.contains("spiffe://cluster.local/ns/shop/sa/impostor")
            && error.contains("spiffe://cluster.local/ns/shop/sa/checkout"),
        "{error}"
    );
    assert!(server_result.is_err());
}

#[test]
fn the_server_refuses_unknown_ca_expired_revoked_and_missing_client_certificates() {
    let mesh = Mesh::new();
    let (server_id, server_creds) = mesh.workload("checkout");
    let server_config = || {
        mesh.settings
            .server_config(&server_creds, Arc::clone(&mesh.trust), TRUST_DOMAIN)
            .unwrap()
    };
    let client_config = |creds: &WorkloadCredentials| {
        mesh.settings
            .client_config(
                creds,
                Arc::clone(&mesh.trust),
                ExpectedPeer::Identity(server_id.clone()),
            )
            .unwrap()
    };

    // A certificate from another CA.
    let stranger = Mesh::new();
    let (_, foreign_creds) = stranger.workload("cart");
    let (_, server_result) = connect(server_config(), client_config(&foreign_creds), preface());
    let error = server_result.unwrap_err();
    assert!(error.contains("UnknownIssuer"), "{error}");

    // An expired certificate.
    let id = SpiffeId::new(TRUST_DOMAIN, "shop", "cart").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let old = mesh
        .ca
        .sign_valid(&key.csr_pem(&id).unwrap(), &id, now - 3 * hour, now - hour)
        .unwrap();
    let expired_creds = WorkloadCredentials::new(&old, &key).unwrap();
    let (_, server_result) = connect(server_config(), client_config(&expired_creds), preface());
    let error = server_result.unwrap_err();
    assert!(error.contains("Expired"), "{error}");

    // A revoked certificate.
    let fresh = mesh.ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
    mesh.trust
        .revoked
        .write()
        .unwrap()
        .revoke_serial(&fresh.serial);
    let revoked_creds = WorkloadCredentials::new(&fresh, &key).unwrap();
    let (_, server_result) = connect(server_config(), client_config(&revoked_creds), preface());
    let error = server_result.unwrap_err();
    assert!(error.contains("Revoked"), "{error}");

    // Its whole identity revoked: a certificate issued before is refused.
    let earlier = mesh.ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
    mesh.trust.revoked.write().unwrap().revoke_identity(
        &id.to_string(),
        veil_identity::revocation::revocation_instant(std::time::SystemTime::now()),
    );
    let earlier_creds = WorkloadCredentials::new(&earlier, &key).unwrap();
    let (_, server_result) = connect(server_config(), client_config(&earlier_creds), preface());
    let error = server_result.unwrap_err();
    assert!(error.contains("Revoked"), "{error}");

    // No client certificate at all.
    let no_cert = rustls::ClientConfig::builder_with_provider(mesh.settings.provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(veil_mtls::verifier::PeerVerifier::new(
            Arc::clone(&mesh.trust),
            ExpectedPeer::Identity(server_id.clone()),
            mesh.settings.provider().signature_verification_algorithms,
        )))
        .with_no_client_auth();
    let (_, server_result) = connect(server_config(), no_cert, preface());
    let error = server_result.unwrap_err();
    assert!(
        error.contains("NoCertificatesPresented") || error.contains("no certificate"),
        "{error}"
    );
}

/// openssl s_client in `dir` with `args`, sending `stdin`; returns stdout+stderr.
fn openssl_client(port: u16, dir: &std::path::Path, args: &[&str], stdin: &[u8]) -> String {
    use std::process::{Command, Stdio};
    let mut child = Command::new("openssl")
        .current_dir(dir)
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-tls1_3",
            "-quiet",
        ])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let output = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
#[ignore = "needs openssl: cargo xtask test runs it"]
fn openssl_with_a_workload_certificate_interoperates_and_without_one_is_refused() {
    veil_testbed::require_program("openssl", "openssl interop test");
    let mesh = Mesh::new();
    let (_, server_creds) = mesh.workload("checkout");
    let id = SpiffeId::new(TRUST_DOMAIN, "shop", "cart").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let issued = mesh.ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("chain.pem"), &issued.chain_pem).unwrap();
    key.save(&dir.path().join("key.pem")).unwrap();
    std::fs::write(dir.path().join("root.pem"), mesh.ca.root_pem()).unwrap();

    for (args, expect_ok) in [
        (
            &[
                // A peer must send its intermediate, as rustls does.
                "-cert",
                "chain.pem",
                "-cert_chain",
                "chain.pem",
                "-key",
                "key.pem",
                "-CAfile",
                "root.pem",
            ][..],
            true,
        ),
        (&["-CAfile", "root.pem"][..], false),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = mesh
            .settings
            .server_config(&server_creds, Arc::clone(&mesh.trust), TRUST_DOMAIN)
            .unwrap();
        let server = std::thread::spawn(move || -> ServerOutcome {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut tls = StreamOwned::new(ServerConnection::new(Arc::new(config)).unwrap(), tcp);
            let mut header = [0u8; veil_mtls::preface::LENGTH];
            tls.read_exact(&mut header).map_err(|e| e.to_string())?;
            let preface = Preface::decode(&header).map_err(|e| e.to_string())?;
            let peer = tls
                .conn
                .peer_certificates()
                .ok_or("no client certificate")?[0]
                .clone();
            let identity = veil_identity::verify::spiffe_id_of(&peer).map_err(|e| e.to_string())?;
            tls.write_all(b"welcome\n").map_err(|e| e.to_string())?;
            tls.conn.send_close_notify();
            let _ = tls.flush();
            Ok((identity, preface))
        });
        let output = openssl_client(port, dir.path(), args, &preface().encode());
        let outcome = server.join().unwrap();
        if expect_ok {
            let (seen, seen_preface) = outcome.unwrap_or_else(|e| panic!("{e}\nopenssl: {output}"));
            assert_eq!(seen, id);
            assert_eq!(seen_preface, preface());
            assert!(output.contains("welcome"), "{output}");
        } else {
            let error = outcome.unwrap_err();
            assert!(
                error.contains("NoCertificatesPresented") || error.contains("certificate"),
                "{error}"
            );
        }
    }
}

/// One connection through the agents' own handshake functions with shared
/// (ticket-holding) configurations; each side's handshake kind or error.
fn agents_connect(
    mesh: &Mesh,
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
    server_id: &SpiffeId,
) -> (
    Result<rustls::HandshakeKind, String>,
    Result<rustls::HandshakeKind, String>,
) {
    use veil_mtls::handshake;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (server, trust) = (Arc::clone(server), Arc::clone(&mesh.trust));
    let server = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let connection = ServerConnection::new(server).unwrap();
        let (mut connection, seen) = handshake::server(connection, &mut tcp, &trust, TRUST_DOMAIN)
            .map_err(|e| e.to_string())?;
        assert_eq!(seen, preface());
        // Accepted: the ticket goes out.
        handshake::send_pending(&mut connection, &mut tcp).map_err(|e| e.to_string())?;
        Ok(connection.handshake_kind().unwrap())
    });
    let mut tcp = TcpStream::connect(address).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let connection = ClientConnection::new(
        Arc::clone(client),
        ServerName::try_from("veil.invalid").unwrap(),
    )
    .unwrap();
    let expected = ExpectedPeer::Identity(server_id.clone());
    let client_result = handshake::client(connection, &mut tcp, &preface(), &mesh.trust, &expected)
        .map_err(|e| e.to_string())
        .and_then(|mut connection| {
            let kind = connection.handshake_kind().unwrap();
            // As on the kernel path: the ticket comes before any data.
            handshake::receive_ticket(&mut connection, &mut tcp)
                .map_err(|e| format!("after a {kind:?} handshake: {e}"))?;
            Ok(kind)
        });
    // A refusing client hangs up; the server must not wait for it.
    drop(tcp);
    (client_result, server.join().unwrap())
}

/// A certificate for `sa` that expires `seconds` from now.
fn short_lived(mesh: &Mesh, sa: &str, seconds: u64) -> (SpiffeId, WorkloadCredentials) {
    let id = SpiffeId::new(TRUST_DOMAIN, "shop", sa).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let now = SystemTime::now();
    let issued = mesh
        .ca
        .sign_valid(
            &key.csr_pem(&id).unwrap(),
            &id,
            now - Duration::from_secs(60),
            now + Duration::from_secs(seconds),
        )
        .unwrap();
    (id, WorkloadCredentials::new(&issued, &key).unwrap())
}

/// Ticket-keeping configurations for `client` dialling `server`.
fn agent_configs(
    mesh: &Mesh,
    server: &WorkloadCredentials,
    server_id: &SpiffeId,
    client: &WorkloadCredentials,
) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let server = mesh
        .settings
        .server_config(server, Arc::clone(&mesh.trust), TRUST_DOMAIN)
        .unwrap();
    let client = mesh
        .settings
        .client_config(
            client,
            Arc::clone(&mesh.trust),
            ExpectedPeer::Identity(server_id.clone()),
        )
        .unwrap();
    (Arc::new(server), Arc::new(client))
}

#[test]
fn sessions_resume_and_a_revocation_sends_peers_back_to_a_full_handshake() {
    use rustls::HandshakeKind::{Full, Resumed};
    let mesh = Mesh::new();
    let (server_id, server_creds) = mesh.workload("checkout");
    let id = SpiffeId::new(TRUST_DOMAIN, "shop", "cart").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let issued = mesh.ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
    let client_creds = WorkloadCredentials::new(&issued, &key).unwrap();
    let (server, client) = agent_configs(&mesh, &server_creds, &server_id, &client_creds);

    // The first handshake is full and leaves a ticket; each later one
    // resumes on it and leaves the next.
    let (client_kind, server_kind) = agents_connect(&mesh, &server, &client, &server_id);
    assert_eq!((client_kind.unwrap(), server_kind.unwrap()), (Full, Full));
    for _ in 0..2 {
        let (client_kind, server_kind) = agents_connect(&mesh, &server, &client, &server_id);
        assert_eq!(
            (client_kind.unwrap(), server_kind.unwrap()),
            (Resumed, Resumed)
        );
    }

    // The client's certificate revoked after its session began: the server
    // declines the ticket, the handshake is full, and its verifier refuses
    // the certificate with an alert the client sees.
    mesh.trust
        .revoked
        .write()
        .unwrap()
        .revoke_serial(&issued.serial);
    let (client_result, server_result) = agents_connect(&mesh, &server, &client, &server_id);
    let error = server_result.unwrap_err();
    assert!(error.contains("Revoked"), "{error}");
    let error = client_result.unwrap_err();
    assert!(error.contains("alert"), "{error}");
}

/// Which end of the connection gets a certificate that expires.
enum Expiring {
    Client,
    Server,
}

/// Cart dialling checkout, where `expiring`'s certificate lives two seconds:
/// a first full handshake leaves a ticket, then that certificate expires.
fn ticket_held_past_expiry(
    expiring: Expiring,
) -> (
    Mesh,
    Arc<rustls::ServerConfig>,
    Arc<rustls::ClientConfig>,
    SpiffeId,
) {
    let mesh = Mesh::new();
    let ((server_id, server_creds), (_, client_creds)) = match expiring {
        Expiring::Client => (mesh.workload("checkout"), short_lived(&mesh, "cart", 2)),
        Expiring::Server => (short_lived(&mesh, "checkout", 2), mesh.workload("cart")),
    };
    let (server, client) = agent_configs(&mesh, &server_creds, &server_id, &client_creds);
    let (client_kind, _) = agents_connect(&mesh, &server, &client, &server_id);
    assert_eq!(client_kind.unwrap(), rustls::HandshakeKind::Full);
    std::thread::sleep(Duration::from_secs(3));
    (mesh, server, client, server_id)
}

#[test]
fn a_resumed_session_is_refused_once_the_client_certificate_expired() {
    let (mesh, server, client, server_id) = ticket_held_past_expiry(Expiring::Client);
    // The ticket still opens (nothing was revoked), so the handshake
    // resumes — the client finishes it — and only the server's check of
    // the restored chain refuses it: no new ticket, the connection closed.
    let (client_result, server_result) = agents_connect(&mesh, &server, &client, &server_id);
    let error = client_result.unwrap_err();
    assert!(
        error.contains("after a Resumed handshake")
            && (error.contains("closed") || error.contains("reset")),
        "{error}"
    );
    let error = server_result.unwrap_err();
    assert!(error.contains("Expired"), "{error}");
    // Having no ticket left, the client's next handshake is a full one,
    // which the server's verifier refuses with an alert.
    let (client_result, server_result) = agents_connect(&mesh, &server, &client, &server_id);
    let error = client_result.unwrap_err();
    assert!(error.contains("alert"), "{error}");
    assert!(server_result.unwrap_err().contains("Expired"));
}

#[test]
fn a_client_refuses_to_resume_with_a_server_whose_certificate_expired() {
    let (mesh, server, client, server_id) = ticket_held_past_expiry(Expiring::Server);
    let (client_result, server_result) = agents_connect(&mesh, &server, &client, &server_id);
    let error = client_result.unwrap_err();
    assert!(error.contains("Expired"), "{error}");
    // Resumed: no certificate crossed, so the client's verifier never ran
    // and sent no alert; its check of the restored chain hung up.
    let error = server_result.unwrap_err();
    assert!(error.contains("closed"), "{error}");
}
