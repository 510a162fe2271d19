//! The relay through an agent-to-agent session, on whatever kernel runs the
//! tests: kernel TLS where it exists, rustls in userspace where it does not
//! (this CI host) — chosen automatically, with the same guarantees.

mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    time::Duration,
};

use common::{SIXTEEN_MIB, pattern, session_pair};
use veil_mtls::{TlsSettings, session::Mode};

/// app ⇄ relay ⇄ session ⇄ relay ⇄ app; returns the two app sockets and the mode.
fn relayed_apps() -> (TcpStream, TcpStream, Mode) {
    let (client_session, server_session) = session_pair(&TlsSettings::default());
    let mode = client_session.mode();
    assert_eq!(server_session.mode(), mode);
    let app_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let front_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let back = TcpStream::connect(app_listener.local_addr().unwrap()).unwrap();
    let (app_server, _) = app_listener.accept().unwrap();
    let app_client = TcpStream::connect(front_listener.local_addr().unwrap()).unwrap();
    let (front, _) = front_listener.accept().unwrap();
    std::thread::spawn(move || client_session.relay(front));
    std::thread::spawn(move || server_session.relay(back));
    (app_client, app_server, mode)
}

#[test]
fn the_mode_follows_the_kernel_and_bytes_arrive_exactly_with_half_close() {
    let (mut app_client, mut app_server, mode) = relayed_apps();
    let expected = if veil_mtls::ktls::kernel_supports_tls() {
        Mode::Kernel
    } else {
        Mode::Userspace
    };
    assert_eq!(mode, expected, "automatic choice");
    let echo = std::thread::spawn(move || {
        let mut all = Vec::new();
        app_server.read_to_end(&mut all).unwrap();
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
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut back = Vec::new();
    app_client.read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    assert_eq!(echo.join().unwrap(), SIXTEEN_MIB);
    assert_eq!(back.len(), SIXTEEN_MIB + 3, "{} mode", mode.as_str());
    assert!(
        back[..SIXTEEN_MIB]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern(i))
    );
    assert_eq!(&back[SIXTEEN_MIB..], b"bye");
}

#[test]
fn a_reset_crosses_the_session() {
    let (mut app_client, app_server, mode) = relayed_apps();
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
    drop(app_server);
    app_client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buffer = [0u8; 16];
    let result = app_client.read(&mut buffer);
    assert!(
        matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{} mode: {result:?}",
        mode.as_str()
    );
}
