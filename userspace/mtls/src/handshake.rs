//! The agent-to-agent handshake, never read past what it needs.
//!
//! After the handshake the session may move into the kernel (kTLS). Every
//! byte rustls has read by then is lost to the kernel, so nothing here ever
//! reads past the record it needs where more may follow: [`read_record`]
//! reads a 5-byte record header, then exactly that record's body. (A client
//! reads the server's flights whole: nothing can follow them until the
//! client's Finished.) The client sends the
//! [`Preface`] in its own record right after its Finished; the server reads
//! records until it has the preface and stops there, leaving the pod's bytes
//! that follow for the kernel (or for the userspace relay).
//!
//! Session tickets: the kernel's RX path cannot take a post-handshake
//! message, so a client going to the kernel first reads the one ticket the
//! server sends (it comes before any application byte; see
//! [`crate::settings::ALPN_PROTOCOL`]) with [`receive_ticket`]. A resumed
//! handshake verifies no certificate, so both sides check the peer chain the
//! session restores as a full handshake would
//! ([`TrustState::check_resumed`]).

use std::{
    io::{Read, Write},
    net::TcpStream,
};

use rustls::{ClientConnection, Connection, ServerConnection};

use crate::{
    preface::{self, Preface, PrefaceError},
    settings::ALPN_PROTOCOL,
    verifier::{ExpectedPeer, TrustState},
};

/// How long a client on the kernel path waits for the server's ticket.
const TICKET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest TLS 1.3 record body: 2^14 plaintext + 256 bytes of expansion.
const MAX_RECORD_BODY: usize = (1 << 14) + 256;
const RECORD_HEADER: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection failed during the TLS handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake refused: {0}")]
    Tls(#[from] rustls::Error),
    #[error("peer closed the connection during the handshake")]
    Closed,
    #[error("peer sent a TLS record of {0} bytes (more than TLS allows)")]
    OversizedRecord(usize),
    #[error("not a TLS record (first bytes {0:02x?}): the peer does not speak TLS")]
    NotTls([u8; 3]),
    #[error("bad connection preface: {0}")]
    Preface(#[from] PrefaceError),
    #[error("the peer sent application data where its session ticket belongs")]
    DataBeforeTicket,
}

/// Reads exactly one TLS record (header and body) from `tcp`.
pub fn read_record(tcp: &mut TcpStream) -> Result<Vec<u8>, HandshakeError> {
    let mut record = vec![0u8; RECORD_HEADER];
    read_exact_or_closed(tcp, &mut record)?;
    // Content type change_cipher_spec/alert/handshake/application_data and a
    // 3.x legacy version: anything else (plaintext HTTP, say) is refused at
    // once instead of waiting for a "record" that never completes.
    if !(20..=23).contains(&record[0]) || record[1] != 3 {
        return Err(HandshakeError::NotTls([record[0], record[1], record[2]]));
    }
    let body = usize::from(u16::from_be_bytes([record[3], record[4]]));
    if body > MAX_RECORD_BODY {
        return Err(HandshakeError::OversizedRecord(body));
    }
    record.resize(RECORD_HEADER + body, 0);
    read_exact_or_closed(tcp, &mut record[RECORD_HEADER..])?;
    Ok(record)
}

fn read_exact_or_closed(tcp: &mut TcpStream, buffer: &mut [u8]) -> Result<(), HandshakeError> {
    tcp.read_exact(buffer).map_err(|error| {
        if error.kind() == std::io::ErrorKind::UnexpectedEof {
            HandshakeError::Closed
        } else {
            HandshakeError::Io(error)
        }
    })
}

/// Feeds one record (or, see [`complete_unflushed`], what arrived) to
/// rustls and returns its state after it. On a TLS error, the alert rustls
/// queued is sent first, so the peer learns why.
fn process_record(
    connection: &mut Connection,
    tcp: &mut TcpStream,
    record: &[u8],
) -> Result<rustls::IoState, HandshakeError> {
    let mut input = record;
    loop {
        connection.read_tls(&mut input)?;
        match connection.process_new_packets() {
            Ok(state) if input.is_empty() => return Ok(state),
            Ok(_) => {}
            Err(error) => {
                let _ = flush(connection, tcp);
                return Err(error.into());
            }
        }
    }
}

/// Sends whatever rustls has queued (a server's session ticket, see [`server`]).
pub fn send_pending(
    connection: &mut Connection,
    tcp: &mut TcpStream,
) -> Result<(), HandshakeError> {
    flush(connection, tcp)
}

fn flush(connection: &mut Connection, tcp: &mut TcpStream) -> Result<(), HandshakeError> {
    while connection.wants_write() {
        connection.write_tls(tcp)?;
    }
    tcp.flush()?;
    Ok(())
}

/// Runs the handshake to completion without reading past its last record,
/// leaving its last flight unsent: a client's Finished goes with the
/// preface in one write (one segment), a server's ticket only to a
/// connection its caller accepts (see [`server`]).
///
/// A client reads whatever has arrived, not one record at a time: until it
/// sends its Finished the server has nothing more to send (its ticket and
/// any data come after it reads that Finished), so nothing past the
/// handshake can be in the socket, and a flight of several records costs
/// one read instead of two per record. A server reads record by record: the
/// client's last flight is followed by the preface and then the pod's bytes.
fn complete_unflushed(
    connection: &mut Connection,
    tcp: &mut TcpStream,
) -> Result<(), HandshakeError> {
    let read_ahead = matches!(connection, Connection::Client(_));
    let mut arrived = vec![0u8; if read_ahead { MAX_RECORD_BODY } else { 0 }];
    while connection.is_handshaking() {
        flush(connection, tcp)?;
        if read_ahead {
            let n = match tcp.read(&mut arrived) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(n) => n,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error.into()),
            };
            process_record(connection, tcp, &arrived[..n])?;
        } else {
            let record = read_record(tcp)?;
            process_record(connection, tcp, &record)?;
        }
    }
    Ok(())
}

/// Client side: handshake, then the preface in its own record, sent with
/// the client's Finished. `expected` is who the server must be, checked
/// again here when the session was resumed.
pub fn client(
    connection: ClientConnection,
    tcp: &mut TcpStream,
    preface: &Preface,
    trust: &TrustState,
    expected: &ExpectedPeer,
) -> Result<Connection, HandshakeError> {
    let mut connection = Connection::from(connection);
    complete_unflushed(&mut connection, tcp)?;
    trust.check_resumed(&connection, expected)?;
    connection.writer().write_all(&preface.encode())?;
    flush(&mut connection, tcp)?;
    Ok(connection)
}

/// Kernel path, client side: reads the session ticket a server that chose
/// [`ALPN_PROTOCOL`] sends before any application byte, so rustls stores it
/// and the kernel never sees a handshake message. Reads exactly the ticket's
/// record; returns at once when no ticket is coming.
pub fn receive_ticket(
    connection: &mut Connection,
    tcp: &mut TcpStream,
) -> Result<(), HandshakeError> {
    let Connection::Client(client) = &*connection else {
        return Ok(());
    };
    if client.alpn_protocol() != Some(ALPN_PROTOCOL) {
        return Ok(());
    }
    let timeout = tcp.read_timeout()?;
    tcp.set_read_timeout(Some(TICKET_TIMEOUT))?;
    let received = read_until_ticket(connection, tcp);
    tcp.set_read_timeout(timeout)?;
    received
}

fn read_until_ticket(
    connection: &mut Connection,
    tcp: &mut TcpStream,
) -> Result<(), HandshakeError> {
    let tickets = |connection: &Connection| match connection {
        Connection::Client(client) => client.tls13_tickets_received(),
        Connection::Server(_) => 0,
    };
    let before = tickets(connection);
    while tickets(connection) == before {
        let record = read_record(tcp)?;
        // What rustls decrypted would be lost when the keys move to the kernel.
        if process_record(connection, tcp, &record)?.plaintext_bytes_to_read() > 0 {
            return Err(HandshakeError::DataBeforeTicket);
        }
    }
    Ok(())
}

/// Server side: handshake, then exactly the records that carry the preface.
/// The client may be any workload of the trust domain; a resumed session's
/// client chain is checked again against `trust` here.
///
/// The session ticket rustls made at the client's Finished is left unsent:
/// only a connection the caller accepts gets one, when
/// [`crate::session::Session::from_handshaken`] (or [`send_pending`]) sends
/// it. A refused client — revoked since its ticket, say — thus gets no fresh
/// ticket to come back with, and its next handshake is a full one.
pub fn server(
    connection: ServerConnection,
    tcp: &mut TcpStream,
    trust: &TrustState,
    trust_domain: &str,
) -> Result<(Connection, Preface), HandshakeError> {
    let mut connection = Connection::from(connection);
    complete_unflushed(&mut connection, tcp)?;
    trust.check_resumed(&connection, &ExpectedPeer::TrustDomain(trust_domain.into()))?;
    let mut bytes = Vec::with_capacity(preface::LENGTH);
    while bytes.len() < preface::LENGTH {
        let record = read_record(tcp)?;
        process_record(&mut connection, tcp, &record)?;
        let mut chunk = [0u8; preface::LENGTH];
        let wanted = preface::LENGTH - bytes.len();
        match connection.reader().read(&mut chunk[..wanted]) {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error.into()),
        }
        // A preface is checked as soon as its first bytes are in, so a
        // plaintext or foreign client is refused without waiting for more.
        if let Err(error @ (PrefaceError::BadMagic | PrefaceError::UnsupportedVersion(_))) =
            Preface::decode(&bytes)
        {
            return Err(error.into());
        }
    }
    Ok((connection, Preface::decode(&bytes)?))
}
