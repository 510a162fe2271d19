//! The relay through an agent-to-agent session, on whatever kernel runs the
//! tests: kernel TLS where it exists, rustls in userspace where it does not
//! (this CI host) — chosen automatically, with the same guarantees.

mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    time::Duration,
};

use common::{Peers, Placement, SIXTEEN_MIB, cut_after, pattern, session_pair};
use veil_mtls::{
    TlsSettings,
    abort::RelayAbort,
    limits::RecordBudget,
    relay::RelayStats,
    session::{Mode, Session},
};

/// app ⇄ relay ⇄ session ⇄ relay ⇄ app; returns the two app sockets and the mode.
fn relayed_apps() -> (TcpStream, TcpStream, Mode) {
    relayed_apps_with_budget(RecordBudget::default())
}

/// Like [`relayed_apps`], the client side's session sending at most `budget` records.
fn relayed_apps_with_budget(budget: RecordBudget) -> (TcpStream, TcpStream, Mode) {
    let (client_session, server_session) = session_pair(&TlsSettings::default());
    relayed_apps_over(client_session, server_session, budget)
}

/// app ⇄ relay ⇄ these sessions ⇄ relay ⇄ app.
fn relayed_apps_over(
    client_session: Session,
    server_session: Session,
    budget: RecordBudget,
) -> (TcpStream, TcpStream, Mode) {
    let mode = client_session.mode();
    assert_eq!(server_session.mode(), mode);
    let (app_client, front) = socket_pair();
    let (back, app_server) = socket_pair();
    std::thread::spawn(move || client_session.relay_with_budget(front, budget));
    std::thread::spawn(move || server_session.relay(back));
    (app_client, app_server, mode)
}

/// Two connected loopback sockets: (connecting side, accepted side).
fn socket_pair() -> (TcpStream, TcpStream) {
    veil_testbed::traffic::loopback_pair().unwrap()
}

/// How `app`'s stream ends once it has read what was queued: a clean end
/// of stream (`Ok`) or the error (a reset, or a timeout after 10 s).
fn how_it_ends(app: &mut TcpStream) -> std::io::Result<()> {
    app.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buffer = [0u8; 64 * 1024];
    loop {
        if app.read(&mut buffer)? == 0 {
            return Ok(());
        }
    }
}

/// app ⇄ relay ⇄ session ⇄ relay (abortable) ⇄ app: the two app sockets,
/// the server side's abort handle and its relay thread, and the mode.
fn relayed_apps_abortable() -> (
    TcpStream,
    TcpStream,
    std::sync::Arc<RelayAbort>,
    std::thread::JoinHandle<std::io::Result<RelayStats>>,
    Mode,
) {
    let (client_session, server_session) = session_pair(&TlsSettings::default());
    let mode = server_session.mode();
    let (app_client, front) = socket_pair();
    let (back, app_server) = socket_pair();
    let abort = std::sync::Arc::new(server_session.abort_handle(&back).unwrap());
    std::thread::spawn(move || client_session.relay(front));
    let server_relay = {
        let abort = std::sync::Arc::clone(&abort);
        std::thread::spawn(move || server_session.relay_abortable(back, &abort))
    };
    (app_client, app_server, abort, server_relay, mode)
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

#[test]
fn an_abort_from_outside_resets_both_applications() {
    let (mut app_client, mut app_server, abort, server_relay, mode) = relayed_apps_abortable();
    app_client.write_all(b"hello").unwrap();
    let mut hello = [0u8; 5];
    app_server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    app_server.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello");

    abort.abort();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(server_relay.join().is_ok()).unwrap());
    assert_eq!(
        finished.recv_timeout(Duration::from_secs(10)),
        Ok(true),
        "{} mode: the relay did not return after the abort",
        mode.as_str()
    );
    drop(abort);
    for (name, app) in [("client", &mut app_client), ("server", &mut app_server)] {
        let result = how_it_ends(app);
        assert!(
            matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{} mode: the {name} application saw {result:?}, not a reset",
            mode.as_str()
        );
    }
}

#[test]
fn an_abort_after_the_relay_ended_leaves_both_clean_ends_alone() {
    let (mut app_client, mut app_server, abort, server_relay, mode) = relayed_apps_abortable();
    app_client.shutdown(Shutdown::Write).unwrap();
    how_it_ends(&mut app_server).expect("half-close relayed to the server");
    app_server.shutdown(Shutdown::Write).unwrap();
    how_it_ends(&mut app_client).expect("half-close relayed to the client");
    server_relay.join().unwrap().unwrap();
    assert!(!abort.is_aborted());
    abort.abort();
    abort.abort();
    assert!(abort.is_aborted());
    for (name, app) in [("client", &mut app_client), ("server", &mut app_server)] {
        let result = how_it_ends(app);
        assert!(
            result.is_ok(),
            "{} mode: the {name} application lost its clean end of stream: {result:?}",
            mode.as_str()
        );
    }
}

#[test]
fn a_peer_stream_cut_without_close_notify_resets_the_pod() {
    // What a forged FIN, or a peer agent that died, leaves: data, then the
    // end of the TCP stream with no close_notify in it.
    let (client_session, server_session) = session_pair(&TlsSettings::default());
    let mode = server_session.mode();
    let (back, mut app_server) = socket_pair();
    let relay = std::thread::spawn(move || server_session.relay(back));
    let peer = cut_after(client_session, b"partial");
    app_server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut partial = [0u8; 7];
    app_server.read_exact(&mut partial).unwrap();
    assert_eq!(&partial, b"partial");
    let result = how_it_ends(&mut app_server);
    assert!(
        matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{} mode: a stream cut without close_notify must reset the pod, not end cleanly: {result:?}",
        mode.as_str()
    );
    let error = relay
        .join()
        .unwrap()
        .expect_err("the relay reports the cut");
    assert!(
        error
            .get_ref()
            .is_some_and(|inner| inner.is::<veil_mtls::relay::Truncated>()),
        "{} mode: {error:?}",
        mode.as_str()
    );
    drop(peer);
}

#[test]
fn half_close_crosses_between_a_kernel_and_a_userspace_side_either_way() {
    // Agents on kernels with and without TLS talk to each other: each end's
    // close_notify must be understood by the other kind. In the kTLS VM one
    // side of each pair runs in the kernel; on a host without TLS both run
    // in rustls.
    let peers = Peers::new(&TlsSettings::default());
    for (client_placement, server_placement) in [
        (Placement::Userspace, Placement::Auto),
        (Placement::Auto, Placement::Userspace),
    ] {
        let (client, _, server) =
            peers.connect_placed(Duration::ZERO, client_placement, server_placement);
        let server = server.join().unwrap();
        let modes = format!(
            "client {}, server {}",
            client.mode().as_str(),
            server.mode().as_str()
        );
        let expected = if veil_mtls::ktls::kernel_supports_tls() {
            Mode::Kernel
        } else {
            Mode::Userspace
        };
        let auto_side = if client_placement == Placement::Auto {
            &client
        } else {
            &server
        };
        assert_eq!(auto_side.mode(), expected, "{modes}");
        let (mut app_client, front) = socket_pair();
        let (back, mut app_server) = socket_pair();
        std::thread::spawn(move || client.relay(front));
        std::thread::spawn(move || server.relay(back));
        exchange_with_half_close(&mut app_client, &mut app_server, 1 << 20, &modes);
        println!("{modes}: half-close both ways");
    }
}

#[test]
fn a_session_is_reset_before_its_record_budget_runs_out() {
    // 16 records of at most 16 KiB: a 16 MiB transfer cannot fit (nor can
    // the socket buffers on the way hold all of it).
    let (mut app_client, mut app_server, mode) = relayed_apps_with_budget(RecordBudget::new(16));
    let writer = {
        let mut writer = app_client.try_clone().unwrap();
        std::thread::spawn(move || {
            let data: Vec<u8> = (0..SIXTEEN_MIB).map(pattern).collect();
            writer.write_all(&data)
        })
    };
    app_server
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut received = Vec::new();
    let server_side = app_server.read_to_end(&mut received);
    assert!(
        received.len() <= 16 * 16 * 1024,
        "{} mode: {} bytes got through a 16-record budget",
        mode.as_str(),
        received.len()
    );
    assert!(
        matches!(&server_side, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{} mode: the far side must see a reset, not a clean end: {server_side:?}",
        mode.as_str()
    );
    app_client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The sender sees the reset on whichever call comes first (a socket
    // error is reported once): its write fails, and reading gets no data.
    let write = writer.join().unwrap();
    assert!(
        matches!(&write, Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)),
        "{} mode: the sender's write must fail with a reset: {write:?}",
        mode.as_str()
    );
    let mut buffer = [0u8; 16];
    let client_side = app_client.read(&mut buffer);
    assert!(
        matches!(&client_side, Ok(0) | Err(_)),
        "{} mode: data after a reset: {client_side:?}",
        mode.as_str()
    );
}

#[test]
fn resumed_sessions_carry_bytes_exactly_on_either_path() {
    // On the kernel path this is what proves a session ticket never reaches
    // the kernel: each handshake leaves one, the client reads it before
    // handing over, and the next connection resumes on it.
    let peers = Peers::new(&TlsSettings::default());
    for round in 0..3 {
        let (client, kind, server) = peers.connect(Duration::ZERO);
        let expected_kind = if round == 0 {
            rustls::HandshakeKind::Full
        } else {
            rustls::HandshakeKind::Resumed
        };
        assert_eq!(kind, expected_kind, "connection {round}");
        let (mut app_client, mut app_server, mode) =
            relayed_apps_over(client, server.join().unwrap(), RecordBudget::default());
        let kernel = veil_mtls::ktls::kernel_supports_tls();
        assert_eq!(mode == Mode::Kernel, kernel, "connection {round}");
        exchange_with_half_close(
            &mut app_client,
            &mut app_server,
            100_000,
            &format!("connection {round}"),
        );
    }
}

/// `request_len` pattern bytes client → server, then a half-close; an
/// answer server → client, then a half-close. Every byte and both clean
/// ends are checked; `what` names the case in failures.
fn exchange_with_half_close(
    app_client: &mut TcpStream,
    app_server: &mut TcpStream,
    request_len: usize,
    what: &str,
) {
    for app in [&*app_client, &*app_server] {
        app.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let request: Vec<u8> = (0..request_len).map(pattern).collect();
    let writer = {
        let (mut writer, request) = (app_client.try_clone().unwrap(), request.clone());
        std::thread::spawn(move || {
            writer.write_all(&request).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut received = Vec::new();
    let end = app_server.read_to_end(&mut received);
    assert!(
        end.is_ok(),
        "{what}: the server app saw {end:?}, not a clean end"
    );
    assert!(received == request, "{what}: request bytes differ");
    writer.join().unwrap();
    app_server.write_all(&request[..4096]).unwrap();
    app_server.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    let end = app_client.read_to_end(&mut answer);
    assert!(
        end.is_ok(),
        "{what}: the client app saw {end:?}, not a clean end"
    );
    assert!(answer == request[..4096], "{what}: answer bytes differ");
}
