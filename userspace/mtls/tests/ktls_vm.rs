//! Kernel TLS, for real: these tests need a kernel with the TLS ULP, which
//! the CI hosts lack, so this target is built only with the `vm-tests`
//! feature (`required-features`), and `cargo xtask test` runs it inside
//! qemu VMs booting Debian's kernels with tls.ko (see xtask/src/vm); on a
//! kernel without TLS every test here fails. There they prove the kernel did the crypto
//! (/proc/net/tls_stat moves) with every cipher suite. The relay's
//! guarantees (byte-exact, half-close, reset) are `session_relay.rs`, which
//! the VM runs too, where it must pick the kernel.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use common::{SIXTEEN_MIB, pattern, session_pair, session_pair_with_server_delay};
use veil_mtls::{TlsSettings, session::Session};

/// Two loopback sockets joined by mutual TLS, both handed to the kernel.
fn ktls_pair(settings: &TlsSettings) -> (TcpStream, TcpStream) {
    match session_pair(settings) {
        (Session::Kernel(client), Session::Kernel(server)) => (server, client),
        _ => panic!("the kernel has TLS here, yet a session stayed in userspace"),
    }
}

fn tls_stat(name: &str) -> u64 {
    std::fs::read_to_string("/proc/net/tls_stat")
        .expect("/proc/net/tls_stat: the kernel has TLS")
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
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

#[test]
fn bytes_sent_right_after_the_preface_are_left_for_the_kernel() {
    // The client writes through its kernel socket while the server has not
    // even started its handshake: the records queue behind the preface, and
    // the server must read exactly up to the preface, no further.
    let (client, server) =
        session_pair_with_server_delay(&TlsSettings::default(), Duration::from_millis(300));
    let Session::Kernel(client) = client else {
        panic!("the kernel has TLS here, yet the client session stayed in userspace");
    };
    let len = 1 << 20;
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..len).map(pattern).collect();
        (&client).write_all(&data).unwrap();
        client
    });
    let Session::Kernel(mut server) = server.join().unwrap() else {
        panic!("the kernel has TLS here, yet the server session stayed in userspace");
    };
    server
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut got = vec![0u8; len];
    server.read_exact(&mut got).unwrap();
    assert!(
        got.iter().enumerate().all(|(i, b)| *b == pattern(i)),
        "bytes differ"
    );
    drop(writer.join().unwrap());
}

#[test]
fn the_kernel_relay_skips_a_late_session_ticket_and_resets_on_a_key_update() {
    use std::os::fd::AsFd;
    use veil_mtls::control_records::{self, CONTENT_HANDSHAKE};
    // Veil's servers send their ticket before the hand-off, where the client
    // reads it; a ticket sent later, or a KeyUpdate, reaches a kernel
    // session's receive path, where splice refuses it. The peer here sends
    // each through its own kernel socket.
    let late_ticket: &[u8] = &[
        4, 0, 0, 18, // NewSessionTicket, 18 bytes
        0, 0, 0, 60, 1, 2, 3, 4, // lifetime, age_add
        1, 0, // nonce
        0, 4, 9, 9, 9, 9, // ticket
        0, 0, // no extensions
    ];
    let key_update: &[u8] = &[24, 0, 0, 1, 0];
    for (name, message, survives) in [
        ("late ticket", late_ticket, true),
        ("KeyUpdate", key_update, false),
    ] {
        let (client, server) = session_pair(&TlsSettings::default());
        let Session::Kernel(peer) = server else {
            panic!("the kernel has TLS here, yet the server session stayed in userspace");
        };
        let (mut app, front) = veil_testbed::traffic::loopback_pair().unwrap();
        let relay = std::thread::spawn(move || client.relay(front));
        control_records::send_record(peer.as_fd(), CONTENT_HANDSHAKE, message).unwrap();
        (&peer).write_all(b"after").unwrap();
        app.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut after = [0u8; 5];
        let read = app.read_exact(&mut after);
        if survives {
            read.unwrap_or_else(|e| panic!("{name}: the data after it did not arrive: {e}"));
            assert_eq!(&after, b"after", "{name}");
            control_records::send_close_notify(peer.as_fd()).unwrap();
            peer.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            let end = app.read_to_end(&mut rest);
            assert!(
                matches!(end, Ok(0)),
                "{name}: the stream must end cleanly: {end:?}"
            );
            drop(app);
            relay.join().unwrap().unwrap();
        } else {
            assert!(
                matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "{name}: the pod must be reset: {read:?}"
            );
            let error = relay
                .join()
                .unwrap()
                .expect_err("the relay ends with an error");
            assert!(
                error.get_ref().is_some_and(|inner| matches!(
                    inner.downcast_ref(),
                    Some(control_records::ControlRecordError::KeyUpdate)
                )),
                "{name}: {error:?}"
            );
        }
        println!("{name}: {}", if survives { "skipped" } else { "reset" });
    }
}
