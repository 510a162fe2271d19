//! The server side: a peer agent's mTLS connection, delivered to a local pod.
//!
//! The certificate presented is the destination workload's (chosen by SNI).
//! After the handshake the agent reads the preface and checks, before any
//! application byte moves, that the destination is a meshed pod here, that
//! the SNI and the preface agree, and that the claimed source address is a
//! pod of the identity the client proved, on the node it connected from.
//! Then it connects to the pod *as the client pod* (IP_TRANSPARENT), so the
//! server application sees its real peer.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{Connection, ServerConnection};
use tracing::{debug, warn};
use veil_identity::{SpiffeId, verify::LeafFacts};
use veil_mtls::{handshake, session::Session};

use super::{
    MeshState, Peer,
    directory::Directory,
    handshake_slots::Slot,
    metrics::Direction,
    names::pod_ip_from_sni,
    refusal::Refusal,
    sockets::{reset, transparent_connect, v4},
};
use veil_mtls::Preface;

/// How long connecting to the local pod may take.
const POD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts peer agents' connections until the listener fails. A connection
/// gets a thread only with a handshake slot; without one it is reset at
/// once, unread (see [`super::handshake_slots`]).
pub fn serve(listener: TcpListener, mesh: Arc<MeshState>, threads: &tokio::runtime::Handle) {
    for stream in listener.incoming() {
        let tcp = match stream {
            Ok(tcp) => tcp,
            Err(error) => {
                super::accept_failed("mesh-in", &error);
                continue;
            }
        };
        match mesh.handshake_slots.admit(&tcp) {
            Ok(slot) => {
                let mesh = Arc::clone(&mesh);
                drop(threads.spawn_blocking(move || handle(&mesh, tcp, slot)));
            }
            Err(refusal) => {
                // Per connection at debug: a flood must not flood the log
                // too; the counter shows it.
                debug!(peer = ?tcp.peer_addr().ok(), "inbound mesh connection refused: {refusal}");
                mesh.metrics
                    .connection(Direction::Inbound, "none", refusal.label());
                reset(tcp);
            }
        }
    }
}

fn handle(mesh: &MeshState, tcp: TcpStream, slot: Slot) {
    let started = Instant::now();
    let peer = tcp.peer_addr().ok();
    match accept_session(mesh, tcp, slot) {
        Ok((session, pod, preface, peer)) => {
            mesh.relay(Direction::Inbound, session, pod, started, &preface, peer);
        }
        Err((refusal, tcp)) => {
            warn!(
                peer = ?peer,
                reason = refusal.label(),
                "inbound mesh connection refused: {refusal}"
            );
            mesh.metrics
                .connection(Direction::Inbound, "none", refusal.label());
            mesh.flows.record(super::flows::Flow {
                direction: Direction::Inbound,
                source: peer,
                destination: None,
                mode: "none",
                result: refusal.label().into(),
                bytes_to_peer: 0,
                bytes_to_pod: 0,
                directory: &mesh.directory,
            });
            if let Some(tcp) = tcp {
                reset(tcp);
            }
        }
    }
}

type Refused = (Refusal, Option<TcpStream>);

/// Handshake and preface under `slot`'s deadline, then the checks; the slot
/// is given back once the peer has authenticated (or failed to).
fn accept_session(
    mesh: &MeshState,
    mut tcp: TcpStream,
    slot: Slot,
) -> Result<(Session, TcpStream, Preface, Peer), Refused> {
    let deadline = mesh.handshake_slots.limits().deadline;
    let _ = tcp.set_nodelay(true);
    // No single read outlasts the whole deadline; the slot's watchdog ends
    // the handshake at the deadline however the peer paces its bytes.
    let _ = tcp.set_read_timeout(Some(deadline));
    let connection = match ServerConnection::new(Arc::clone(&mesh.server_config)) {
        Ok(connection) => connection,
        Err(error) => return Err((Refusal::Handshake(error.into()), Some(tcp))),
    };
    let trust_domain = mesh.directory.store.trust_domain();
    let handshaken = handshake::server(connection, &mut tcp, &mesh.trust, trust_domain);
    let expired = slot.expired();
    drop(slot);
    if expired {
        return Err((Refusal::HandshakeDeadline(deadline), Some(tcp)));
    }
    let (connection, preface) = match handshaken {
        Ok(done) => done,
        Err(error) => return Err((error.into(), Some(tcp))),
    };
    mesh.metrics.handshake(Direction::Inbound, &connection);
    let _ = tcp.set_read_timeout(None);
    let checked = check(mesh, &tcp, &connection, &preface).and_then(|peer| {
        let pod = transparent_connect(
            preface.source,
            preface.original_destination,
            POD_CONNECT_TIMEOUT,
        )?;
        Ok((pod, peer))
    });
    let (pod, peer) = match checked {
        Ok(checked) => checked,
        Err(refusal) => return Err((refusal, Some(tcp))),
    };
    match Session::from_handshaken(connection, tcp, mesh.kernel_tls) {
        Ok(session) => Ok((session, pod, preface, peer)),
        Err(error) => {
            reset(pod);
            Err((error.into(), None))
        }
    }
}

/// Everything that must hold before the pod sees a byte; returns who the
/// peer is.
fn check(
    mesh: &MeshState,
    tcp: &TcpStream,
    connection: &Connection,
    preface: &Preface,
) -> Result<Peer, Refusal> {
    let certificate = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| Refusal::PeerIdentity("no client certificate".into()))
        .and_then(|leaf| LeafFacts::of(leaf).map_err(|e| Refusal::PeerIdentity(e.to_string())))?;
    let sni = match connection {
        Connection::Server(server) => server.server_name().map(str::to_owned),
        Connection::Client(_) => None,
    }
    .unwrap_or_default();
    let destination = *preface.original_destination.ip();
    if pod_ip_from_sni(&sni) != Some(destination) {
        return Err(Refusal::SniMismatch {
            preface: destination.to_string(),
            sni,
        });
    }
    let node = *v4(tcp.peer_addr()?).ok_or(Refusal::NotIpv4)?.ip();
    allowed(
        &mesh.directory,
        preface.source,
        preface.original_destination,
        &certificate.identity,
        node,
    )?;
    debug!(
        source = %preface.source,
        destination = %preface.original_destination,
        identity = %certificate.identity,
        "inbound mTLS session accepted"
    );
    Ok(Peer { certificate, node })
}

/// Whether the agent at `peer_node`, proven to be `peer_identity`, may
/// carry `source` → `destination`: the destination is a meshed pod here,
/// the source a pod of that identity on that node, and the destination's
/// allow rules admit it. Decided at the handshake, and again for a running
/// session whenever the inventory changes ([`super::live`]).
pub(super) fn allowed(
    directory: &Directory,
    source: SocketAddrV4,
    destination: SocketAddrV4,
    peer_identity: &SpiffeId,
    peer_node: Ipv4Addr,
) -> Result<(), Refusal> {
    let destination_pod = directory
        .local_meshed_pod(*destination.ip())?
        .ok_or_else(|| Refusal::DestinationNotMeshed(destination.ip().to_string()))?;
    match directory.meshed_pod(*source.ip())? {
        Some(pod) if pod.identity == *peer_identity && pod.node_underlay_ip == peer_node => {
            directory.authorize(&destination_pod, destination.port(), peer_identity)
        }
        _ => Err(Refusal::SourceMismatch {
            address: source.to_string(),
            identity: peer_identity.to_string(),
            node: peer_node.to_string(),
        }),
    }
}
