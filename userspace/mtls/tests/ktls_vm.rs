//! Kernel TLS, for real: these tests need a kernel with the TLS ULP, which
//! the CI hosts lack, so they are `#[ignore]`d here and run by
//! `cargo xtask test` inside a qemu VM booting Debian's kernel with tls.ko
//! (see xtask/src/ktls_vm.rs). There they prove the kernel did the crypto
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

#[test]
#[ignore = "needs a kernel with TLS: cargo xtask test runs it in a qemu VM"]
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
