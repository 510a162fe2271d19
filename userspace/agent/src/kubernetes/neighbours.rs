//! Finding a Kubernetes pod's host-side veth and MAC on this node.
//!
//! The API server knows a pod's address, not its wiring. The CNI plugin
//! (ptp, Calico and the like) leaves a `/32` route to the pod via its
//! host-side veth, so the kernel's route lookup names the interface, and the
//! kernel's neighbour table holds the pod's MAC once it has resolved it. When
//! it has not yet, one UDP datagram to the discard port makes the kernel ARP
//! for it; the answer lands in the neighbour table within milliseconds.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::{
    inventory::MacAddress,
    iproute::{self, IpError},
};

/// How long a resolution waits for the kernel's ARP answer.
const ARP_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error(transparent)]
    Ip(#[from] IpError),
    #[error("`ip {args}` printed unexpected output: {reason}")]
    Output { args: String, reason: String },
    #[error(
        "no route to {ip} through a local interface (the CNI plugin should leave a /32 \
         route to each pod via its host-side veth)"
    )]
    NoInterface { ip: Ipv4Addr },
    #[error("{ip} on {interface} did not answer ARP within {ARP_WAIT:?} (is the pod up?)")]
    NoAnswer { ip: Ipv4Addr, interface: String },
}

#[derive(Deserialize)]
struct RouteEntry {
    dev: Option<String>,
    gateway: Option<String>,
}

#[derive(Deserialize)]
struct NeighbourEntry {
    lladdr: Option<String>,
}

fn ip_json<T: for<'de> Deserialize<'de>>(args: &[&str]) -> Result<Vec<T>, NeighbourError> {
    let json_args: Vec<&str> = std::iter::once("-j").chain(args.iter().copied()).collect();
    let stdout = iproute::ip(&json_args)?;
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&stdout).map_err(|e| NeighbourError::Output {
        args: json_args.join(" "),
        reason: e.to_string(),
    })
}

/// The host-side interface the kernel routes `ip` through, when it is a
/// directly attached one (a pod's veth, not a gateway).
pub fn interface_of(ip: Ipv4Addr) -> Result<String, NeighbourError> {
    let text = ip.to_string();
    let routes: Vec<RouteEntry> = ip_json(&["route", "get", &text])?;
    routes
        .into_iter()
        .find(|r| r.gateway.is_none())
        .and_then(|r| r.dev)
        .filter(|dev| dev != "lo")
        .ok_or(NeighbourError::NoInterface { ip })
}

fn known_mac(ip: Ipv4Addr, interface: &str) -> Result<Option<MacAddress>, NeighbourError> {
    let text = ip.to_string();
    let entries: Vec<NeighbourEntry> = ip_json(&["neigh", "show", &text, "dev", interface])?;
    Ok(entries
        .into_iter()
        .filter_map(|e| e.lladdr)
        .find_map(|mac| mac.parse().ok()))
}

/// The pod's veth and MAC, asking the kernel to resolve the MAC if needed.
pub fn resolve(ip: Ipv4Addr) -> Result<(String, MacAddress), NeighbourError> {
    let interface = interface_of(ip)?;
    if let Some(mac) = known_mac(ip, &interface)? {
        return Ok((interface, mac));
    }
    // Any datagram makes the kernel resolve the next hop; the discard port
    // (9) keeps it meaningless to the pod.
    if let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        let _ = socket.send_to(b"", (ip, 9));
    }
    let started = Instant::now();
    while started.elapsed() < ARP_WAIT {
        std::thread::sleep(Duration::from_millis(10));
        if let Some(mac) = known_mac(ip, &interface)? {
            return Ok((interface, mac));
        }
    }
    Err(NeighbourError::NoAnswer { ip, interface })
}
