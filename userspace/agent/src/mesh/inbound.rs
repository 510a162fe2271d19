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
    metrics::Direction,
    names::pod_ip_from_sni,
    refusal::Refusal,
    sockets::{reset, transparent_connect, v4},
};
use veil_mtls::Preface;

/// How long connecting to the local pod may take.
const POD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a peer may take to finish the handshake and send the preface.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts peer agents' connections until the listener fails.
pub fn serve(listener: TcpListener, mesh: Arc<MeshState>, threads: &tokio::runtime::Handle) {
    super::accept_loop(listener, "mesh-in", threads, move |tcp| {
        handle(&mesh, tcp);
    });
}

fn handle(mesh: &MeshState, tcp: TcpStream) {
    let started = Instant::now();
    let peer = tcp.peer_addr().ok();
    match accept_session(mesh, tcp) {
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

fn accept_session(
    mesh: &MeshState,
    mut tcp: TcpStream,
) -> Result<(Session, TcpStream, Preface, Peer), Refused> {
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let connection = match ServerConnection::new(Arc::clone(&mesh.server_config)) {
        Ok(connection) => connection,
        Err(error) => return Err((Refusal::Handshake(error.into()), Some(tcp))),
    };
    let trust_domain = mesh.directory.store.trust_domain();
    let (connection, preface) =
        match handshake::server(connection, &mut tcp, &mesh.trust, trust_domain) {
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
