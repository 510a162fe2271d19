//! The collect_md vxlan device behind `encapsulation = "vxlan-device"`.
//!
//! In that mode the pod-egress program does not write outer headers: it
//! attaches a tunnel key (VNI, peer node, TOS) to the packet and redirects it
//! to this device, and the kernel's vxlan driver encapsulates and routes it
//! out of the underlay. Decapsulation stays in our XDP program either way.
//! The agent owns the device: it makes it at start (replacing a leftover of
//! a crashed run) and deletes it on exit.

use tracing::{info, warn};
use veil_common::overlay::VXLAN_PORT;

use crate::iproute::{IpError, ip};

/// The device's name on every node.
pub const TUNNEL_DEVICE: &str = "veil_vxlan";

/// Outer Ethernet + IPv4 + UDP + VXLAN.
const VXLAN_OVERHEAD: u32 = 50;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(
        "cannot create the vxlan device for encapsulation = \"vxlan-device\" (the agent needs \
         CAP_NET_ADMIN and a kernel with the vxlan module; or use encapsulation = \"tc\"): \
         {0}"
    )]
    Ip(#[from] IpError),
    #[error("the vxlan device {TUNNEL_DEVICE} vanished right after it was made")]
    Vanished,
}

/// The device, deleted when dropped.
#[derive(Debug)]
pub struct TunnelDevice {
    ifindex: u32,
}

impl TunnelDevice {
    /// Makes the device (collect_md, our VXLAN port, no learning) with room
    /// for the outer headers under `underlay_mtu`, and brings it up.
    pub fn create(underlay_mtu: u32) -> Result<Self, TunnelError> {
        if ip(&["link", "show", "dev", TUNNEL_DEVICE]).is_ok() {
            warn!(
                device = TUNNEL_DEVICE,
                "replacing a vxlan device left by an earlier run"
            );
            ip(&["link", "del", "dev", TUNNEL_DEVICE])?;
        }
        let port = VXLAN_PORT.to_string();
        ip(&[
            "link",
            "add",
            TUNNEL_DEVICE,
            "type",
            "vxlan",
            "external",
            "dstport",
            &port,
            "nolearning",
        ])?;
        // From here on the guard deletes the device if anything fails.
        let mut device = Self { ifindex: 0 };
        let mtu = underlay_mtu.saturating_sub(VXLAN_OVERHEAD).to_string();
        ip(&["link", "set", "dev", TUNNEL_DEVICE, "mtu", &mtu, "up"])?;
        device.ifindex =
            nix::net::if_::if_nametoindex(TUNNEL_DEVICE).map_err(|_| TunnelError::Vanished)?;
        info!(
            device = TUNNEL_DEVICE,
            ifindex = device.ifindex,
            "encapsulating through a collect_md vxlan device"
        );
        Ok(device)
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }
}

impl Drop for TunnelDevice {
    fn drop(&mut self) {
        if let Err(error) = ip(&["link", "del", "dev", TUNNEL_DEVICE]) {
            warn!(%error, device = TUNNEL_DEVICE, "cannot delete the vxlan device");
        }
    }
}
