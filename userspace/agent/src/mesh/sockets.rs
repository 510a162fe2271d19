//! The sockets of transparent proxying, behind a small safe API.
//!
//! `IP_TRANSPARENT` lets the agent accept connections addressed to other
//! hosts (the eBPF program assigns them to its listener; the accepted
//! socket's local address is the original destination) and connect from an
//! address that is not the node's (the client pod's), so the server app sees
//! its real peer. It needs CAP_NET_ADMIN.

use std::{
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::OwnedFd,
    time::Duration,
};

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, sockopt};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "cannot set up a transparent socket for {address} (the agent needs CAP_NET_ADMIN): {source}"
    )]
    Transparent {
        address: SocketAddrV4,
        source: nix::Error,
    },
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddrV4,
        source: nix::Error,
    },
    #[error("cannot connect to {destination} as {source_address}: {source}")]
    Connect {
        source_address: SocketAddrV4,
        destination: SocketAddrV4,
        source: nix::Error,
    },
}

fn tcp_socket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// A listener that also accepts connections the datapath assigns to it for
/// other destinations.
pub fn transparent_listener(address: SocketAddrV4) -> Result<TcpListener, SocketError> {
    let listen_error = |source| SocketError::Listen { address, source };
    let fd = tcp_socket().map_err(listen_error)?;
    socket::setsockopt(&fd, sockopt::IpTransparent, &true)
        .map_err(|source| SocketError::Transparent { address, source })?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(listen_error)?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(address),
    )
    .map_err(listen_error)?;
    socket::listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN)).map_err(listen_error)?;
    Ok(TcpListener::from(fd))
}

/// Connects to `destination` from `source_address`, an address that need not
/// be the node's. The kernel picks the source port at connect time
/// (`IP_BIND_ADDRESS_NO_PORT`), so a port is only taken per destination: a
/// bind to port 0 would reserve a port no other connection from that pod's
/// address may use, and with TIME_WAIT holding each for a minute a busy
/// client pod would run the node out of ports (EADDRINUSE) at a few hundred
/// connections per second.
pub fn transparent_connect(
    source_address: SocketAddrV4,
    destination: SocketAddrV4,
    timeout: Duration,
) -> Result<TcpStream, SocketError> {
    let error = |source| SocketError::Connect {
        source_address,
        destination,
        source,
    };
    let fd = tcp_socket().map_err(error)?;
    socket::setsockopt(&fd, sockopt::IpTransparent, &true).map_err(|source| {
        SocketError::Transparent {
            address: source_address,
            source,
        }
    })?;
    socket::setsockopt(&fd, sockopt::IpBindAddressNoPort, &true).map_err(error)?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    socket::bind(
        raw,
        &SockaddrIn::from(SocketAddrV4::new(*source_address.ip(), 0)),
    )
    .map_err(error)?;
    // connect(2) honours the send timeout.
    let timeval =
        nix::sys::time::TimeVal::new(timeout.as_secs() as i64, i64::from(timeout.subsec_micros()));
    socket::setsockopt(&fd, sockopt::SendTimeout, &timeval).map_err(error)?;
    socket::connect(raw, &SockaddrIn::from(destination)).map_err(error)?;
    socket::setsockopt(
        &fd,
        sockopt::SendTimeout,
        &nix::sys::time::TimeVal::new(0, 0),
    )
    .map_err(error)?;
    let stream = TcpStream::from(fd);
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Closes `stream` with a reset (the peer sees ECONNRESET, not a clean end):
/// how a refused or denied connection ends.
pub fn reset(stream: TcpStream) {
    veil_mtls::relay::reset_on_close(&stream);
    drop(stream);
}

/// The IPv4 form of a socket address (the mesh is IPv4-only for now).
pub fn v4(address: SocketAddr) -> Option<SocketAddrV4> {
    match address {
        SocketAddr::V4(v4) => Some(v4),
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, v6.port())),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// Runs `body` on a thread of its own in a new network namespace with
    /// loopback up and only `ports` as ephemeral ports.
    fn in_new_netns(ports: &'static str, body: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect(
                "this test makes a network namespace: run it as root (cargo xtask test does)",
            );
            // The child inherits this thread's namespace.
            crate::iproute::ip(&["link", "set", "lo", "up"]).expect("bring loopback up");
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", ports)
                .expect("set the namespace's ephemeral port range");
            body();
        })
        .join()
        .expect("test thread");
    }

    #[test]
    fn connections_from_one_pod_address_share_source_ports_across_destinations() {
        in_new_netns("40000 40001", || {
            let listeners: Vec<TcpListener> = [7001, 7002]
                .into_iter()
                .map(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("listener"))
                .collect();
            let pod = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 0);
            // Two ephemeral ports, two destinations: four connections fit
            // only if a port is taken per destination, not per source.
            let held: Vec<TcpStream> = [7001, 7002, 7001, 7002]
                .into_iter()
                .enumerate()
                .map(|(n, port)| {
                    transparent_connect(
                        pod,
                        SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
                        Duration::from_secs(2),
                    )
                    .unwrap_or_else(|e| panic!("connection {} of 4: {e}", n + 1))
                })
                .collect();
            for stream in &held {
                assert_eq!(stream.local_addr().unwrap().ip(), *pod.ip());
            }
            drop(listeners);
        });
    }
}
