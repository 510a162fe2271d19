//! Kernel TLS, for real: these tests need a kernel with the TLS ULP, which
//! the CI hosts lack, so they are `#[ignore]`d here and run by
//! `cargo xtask test` inside a qemu VM booting Debian's kernel with tls.ko
//! (see xtask/src/ktls_vm.rs). There they prove the kernel did the crypto
//! (/proc/net/tls_stat moves), byte-exact transfers in both directions
//! through the splice relay, half-close and reset propagation.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsFd,
    sync::Arc,
    time::Duration,
};

use rustls::{ClientConnection, Connection, ServerConnection, pki_types::ServerName};
use veil_identity::{CertificateAuthority, SpiffeId, WorkloadKey, ca::DEFAULT_LEAF_LIFETIME};
use veil_mtls::{
    TlsSettings, WorkloadCredentials, ktls, relay,
    verifier::{ExpectedPeer, TrustState},
};

const TRUST_DOMAIN: &str = "cluster.local";
const SIXTEEN_MIB: usize = 16 << 20;

fn credentials(ca: &CertificateAuthority, sa: &str) -> (SpiffeId, WorkloadCredentials) {
    let id = SpiffeId::new(TRUST_DOMAIN, "shop", sa).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let issued = ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
    (id, WorkloadCredentials::new(&issued, &key).unwrap())
}

/// Completes the handshake on `tcp`, flushes, and hands the keys to the kernel.
fn handshake_into_kernel(mut connection: Connection, tcp: &mut TcpStream) {
    while connection.is_handshaking() {
        connection.complete_io(tcp).unwrap();
    }
    while connection.wants_write() {
        connection.write_tls(tcp).unwrap();
    }
    let secrets = match connection {
        Connection::Client(c) => c.dangerous_extract_secrets(),
        Connection::Server(s) => s.dangerous_extract_secrets(),
    }
    .unwrap();
    ktls::enable(tcp.as_fd(), secrets).unwrap();
}

/// Two loopback sockets joined by mutual TLS, both handed to the kernel.
fn ktls_pair(settings: &TlsSettings) -> (TcpStream, TcpStream) {
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
    let (server_id, server_creds) = credentials(&ca, "checkout");
    let (_, client_creds) = credentials(&ca, "cart");
    let mut server_config = settings
        .server_config(&server_creds, Arc::clone(&trust), TRUST_DOMAIN)
        .unwrap();
    // A session ticket on the kernel's RX path would stall it.
    server_config.send_tls13_tickets = 0;
    let client_config = settings
        .client_config(&client_creds, trust, ExpectedPeer::Identity(server_id))
        .unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        let connection = ServerConnection::new(Arc::new(server_config)).unwrap();
        handshake_into_kernel(connection.into(), &mut tcp);
        // Tell the client the kernel owns the session before it sends a byte,
        // so rustls never buffers application data meant for the kernel.
        tcp.write_all(b"G").unwrap();
        tcp
    });
    let mut client = TcpStream::connect(address).unwrap();
    let connection = ClientConnection::new(
        Arc::new(client_config),
        ServerName::try_from("veil.invalid").unwrap(),
    )
    .unwrap();
    handshake_into_kernel(connection.into(), &mut client);
    let mut go = [0u8; 1];
    client.read_exact(&mut go).unwrap();
    assert_eq!(&go, b"G");
    (server.join().unwrap(), client)
}

fn tls_stat(name: &str) -> u64 {
    std::fs::read_to_string("/proc/net/tls_stat")
        .expect("/proc/net/tls_stat: the kernel has TLS")
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

fn pattern(offset: usize) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 11)) as u8
}

/// Writes `len` pattern bytes to `w` on a thread, reads and checks `len` from `r`.
fn send_and_check(mut w: TcpStream, mut r: TcpStream, len: usize) {
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..len).map(pattern).collect();
        w.write_all(&data).unwrap();
        w
    });
    r.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut got = vec![0u8; len];
    r.read_exact(&mut got).unwrap();
    assert!(
        got.iter().enumerate().all(|(i, b)| *b == pattern(i)),
        "bytes differ"
    );
    drop(writer.join().unwrap());
}

#[test]
#[ignore = "needs a kernel with TLS: cargo xtask test runs it in a qemu VM"]
fn ktls_carries_16_mib_each_way_with_every_cipher_suite() {
    let all = TlsSettings::default();
    for suite in all.cipher_suites.clone() {
        let settings = TlsSettings {
            cipher_suites: vec![suite],
            ..TlsSettings::default()
        };
        let (tx_before, rx_before) = (tls_stat("TlsTxSw"), tls_stat("TlsRxSw"));
        let (server, client) = ktls_pair(&settings);
        send_and_check(
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
            SIXTEEN_MIB,
        );
        send_and_check(server, client, SIXTEEN_MIB);
        // Both ends installed TX and RX in the kernel's software TLS.
        assert!(
            tls_stat("TlsTxSw") >= tx_before + 2,
            "{suite:?}: kernel TX sessions"
        );
        assert!(
            tls_stat("TlsRxSw") >= rx_before + 2,
            "{suite:?}: kernel RX sessions"
        );
        println!("{:?}: 16 MiB each way through kTLS", suite.suite());
    }
}

/// app ⇄ relay ⇄ kTLS ⇄ relay ⇄ app; returns (client app socket, server app socket).
fn relayed_apps() -> (TcpStream, TcpStream) {
    let (k_server, k_client) = ktls_pair(&TlsSettings::default());
    let app_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let front_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let back = TcpStream::connect(app_listener.local_addr().unwrap()).unwrap();
    let (app_server, _) = app_listener.accept().unwrap();
    let app_client = TcpStream::connect(front_listener.local_addr().unwrap()).unwrap();
    let (front, _) = front_listener.accept().unwrap();
    std::thread::spawn(move || relay::splice_relay(front, k_client));
    std::thread::spawn(move || relay::splice_relay(k_server, back));
    (app_client, app_server)
}

#[test]
#[ignore = "needs a kernel with TLS: cargo xtask test runs it in a qemu VM"]
fn splice_relay_is_byte_exact_and_propagates_half_close() {
    let (mut app_client, mut app_server) = relayed_apps();
    let echo = std::thread::spawn(move || {
        let mut all = Vec::new();
        app_server.read_to_end(&mut all).unwrap(); // ends on the client's half-close
        app_server.write_all(&all).unwrap();
        app_server.write_all(b"bye").unwrap();
        app_server.shutdown(Shutdown::Write).unwrap();
        all.len()
    });
    let data: Vec<u8> = (0..SIXTEEN_MIB).map(pattern).collect();
    let mut writer = app_client.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        writer.write_all(&data).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    app_client
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut back = Vec::new();
    app_client.read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    assert_eq!(
        echo.join().unwrap(),
        SIXTEEN_MIB,
        "server saw every byte, then EOF"
    );
    assert_eq!(back.len(), SIXTEEN_MIB + 3);
    assert!(
        back[..SIXTEEN_MIB]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern(i))
    );
    assert_eq!(
        &back[SIXTEEN_MIB..],
        b"bye",
        "data after the client's half-close still arrives"
    );
}

#[test]
#[ignore = "needs a kernel with TLS: cargo xtask test runs it in a qemu VM"]
fn a_reset_on_one_side_resets_the_other() {
    let (mut app_client, app_server) = relayed_apps();
    app_client.write_all(b"hello").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::socket::setsockopt(
        &app_server,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .unwrap();
    drop(app_server); // RST
    app_client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buffer = [0u8; 16];
    let result = app_client.read(&mut buffer);
    assert!(
        matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{result:?}"
    );
}
