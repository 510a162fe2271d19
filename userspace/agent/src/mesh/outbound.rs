//! The client side: a local pod's intercepted connection, carried to the
//! destination node's agent over mTLS.
//!
//! The eBPF program assigned the pod's SYN to the transparent listener on
//! 127.0.0.1:15001, so the accepted socket's local address is where the pod
//! was connecting to. The agent dials the agent of the destination's node on
//! :15008, presents the source workload's certificate, insists on the
//! destination workload's identity, sends the preface and relays. A
//! connection to a meshed pod of this same node arrives only when the allow
//! rules refuse it, and is refused.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{ClientConnection, pki_types::ServerName};
use tracing::{debug, warn};
use veil_identity::{SpiffeId, verify::LeafFacts};
use veil_mtls::{Preface, handshake, session::Session, verifier::ExpectedPeer};

use super::{
    MeshState, Peer,
    directory::{Directory, MeshedPod},
    metrics::Direction,
    names::sni_for,
    refusal::Refusal,
    sockets::{reset, v4},
};

/// How long dialing a peer agent may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts intercepted connections until the listener fails.
pub fn serve(listener: TcpListener, mesh: Arc<MeshState>, threads: &tokio::runtime::Handle) {
    super::accept_loop(listener, "mesh-out", threads, move |pod| {
        handle(&mesh, pod);
    });
}

fn handle(mesh: &MeshState, pod: TcpStream) {
    let started = Instant::now();
    let _ = pod.set_nodelay(true);
    match open_session(mesh, &pod) {
        Ok((session, preface, peer)) => {
            mesh.relay(Direction::Outbound, session, pod, started, &preface, peer);
        }
        Err(refusal) => {
            warn!(
                client = ?pod.peer_addr().ok(),
                destination = ?pod.local_addr().ok(),
                reason = refusal.label(),
                "outbound mesh connection refused: {refusal}"
            );
            mesh.metrics
                .connection(Direction::Outbound, "none", refusal.label());
            mesh.flows.record(super::flows::Flow {
                direction: Direction::Outbound,
                source: pod.peer_addr().ok(),
                destination: pod.local_addr().ok(),
                mode: "none",
                result: refusal.label().into(),
                bytes_to_peer: 0,
                bytes_to_pod: 0,
                directory: &mesh.directory,
            });
            reset(pod);
        }
    }
}

fn open_session(mesh: &MeshState, pod: &TcpStream) -> Result<(Session, Preface, Peer), Refusal> {
    let (Some(client), Some(destination)) = (v4(pod.peer_addr()?), v4(pod.local_addr()?)) else {
        return Err(Refusal::NotIpv4);
    };
    let directory = &mesh.directory;
    if let Some(destination_pod) = directory.local_meshed_pod(*destination.ip())? {
        return Err(refuse_same_node(
            directory,
            client,
            destination,
            &destination_pod,
        ));
    }
    let (source_pod, destination_pod) = endpoints(directory, client, destination)?;
    let workload = directory
        .store
        .get(&source_pod.identity)
        .map_err(|e| Refusal::Certificate(e.to_string()))?;
    let config = mesh
        .client_configs
        .get(
            &mesh.settings,
            &mesh.trust,
            &workload,
            &destination_pod.identity,
        )
        .map_err(|e| Refusal::Certificate(e.to_string()))?;
    let peer = SocketAddr::from((destination_pod.node_underlay_ip, mesh.inbound_port));
    let mut tcp = TcpStream::connect_timeout(&peer, DIAL_TIMEOUT).map_err(|source| {
        Refusal::PeerUnreachable {
            address: peer.to_string(),
            source,
        }
    })?;
    let _ = tcp.set_nodelay(true);
    let server_name = ServerName::try_from(sni_for(*destination.ip()))
        .map_err(|e| Refusal::Certificate(format!("invalid server name: {e}")))?;
    let connection =
        ClientConnection::new(config, server_name).map_err(|e| Refusal::Handshake(e.into()))?;
    let preface = Preface {
        original_destination: destination,
        source: client,
    };
    let expected = ExpectedPeer::Identity(destination_pod.identity.clone());
    let connection = handshake::client(connection, &mut tcp, &preface, &mesh.trust, &expected)?;
    mesh.metrics.handshake(Direction::Outbound, &connection);
    let certificate = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| Refusal::PeerIdentity("no server certificate".into()))
        .and_then(|leaf| LeafFacts::of(leaf).map_err(|e| Refusal::PeerIdentity(e.to_string())))?;
    debug!(
        client = %client,
        destination = %destination,
        peer_identity = %destination_pod.identity,
        "outbound mTLS session established"
    );
    let peer = Peer {
        certificate,
        node: destination_pod.node_underlay_ip,
    };
    Ok((
        Session::from_handshaken(connection, tcp, mesh.kernel_tls)?,
        preface,
        peer,
    ))
}

/// Why a connection between two meshed pods of this node was refused. Such
/// connections stay plaintext and go straight to the pod; one reaches the
/// agent only when the datapath found the allow rules refusing it
/// (`SAME_NODE_VERDICTS`, computed by the same [`Directory::authorize`]).
fn refuse_same_node(
    directory: &Directory,
    client: SocketAddrV4,
    destination: SocketAddrV4,
    destination_pod: &MeshedPod,
) -> Refusal {
    let source_pod = match directory.local_meshed_pod(*client.ip()) {
        Ok(Some(pod)) => pod,
        Ok(None) => return Refusal::SourceNotMeshed(client.ip().to_string()),
        Err(refusal) => return refusal,
    };
    match directory.authorize(destination_pod, destination.port(), &source_pod.identity) {
        Err(refusal) => refusal,
        Ok(()) => Refusal::SameNodeRulesChanged(destination.to_string()),
    }
}

/// The two pods of an intercepted connection: the source a meshed pod
/// here, the destination a meshed pod on another node. Decided when the pod
/// connects, and again for a running session whenever the inventory changes
/// ([`super::live`]).
pub(super) fn endpoints(
    directory: &Directory,
    client: SocketAddrV4,
    destination: SocketAddrV4,
) -> Result<(MeshedPod, MeshedPod), Refusal> {
    let source_pod = directory
        .local_meshed_pod(*client.ip())?
        .ok_or_else(|| Refusal::SourceNotMeshed(client.ip().to_string()))?;
    let destination_pod = directory
        .meshed_pod(*destination.ip())?
        .filter(|pod| pod.node != directory.node_name)
        .ok_or_else(|| Refusal::DestinationNotMeshed(destination.to_string()))?;
    Ok((source_pod, destination_pod))
}

/// Whether a running outbound session still goes where the inventory says:
/// both pods still meshed, and the destination still the workload whose
/// agent the session reached (an address now given to another workload, or
/// a pod moved to another node, is not the peer this session proved).
pub(super) fn still_allowed(
    directory: &Directory,
    client: SocketAddrV4,
    destination: SocketAddrV4,
    peer_identity: &SpiffeId,
    peer_node: Ipv4Addr,
) -> Result<(), Refusal> {
    let (_, destination_pod) = endpoints(directory, client, destination)?;
    if destination_pod.identity != *peer_identity || destination_pod.node_underlay_ip != peer_node {
        return Err(Refusal::DestinationChanged {
            destination: destination.to_string(),
            was: format!("{peer_identity} on {peer_node}"),
            now: format!(
                "{} on {}",
                destination_pod.identity, destination_pod.node_underlay_ip
            ),
        });
    }
    Ok(())
}
