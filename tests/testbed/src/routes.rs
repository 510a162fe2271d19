//! Per-pod-pair routing between nodes: plain routes or the kernel's own VXLAN.
//!
//! With [`crate::Routing::None`] nothing crosses nodes until a caller routes
//! a pair of pods explicitly. Benchmarks use this to give each configuration
//! its own pod pair, all configured at once, so runs can interleave without
//! reconfiguring anything.

use crate::{PodRef, Result, Topology, addressing};

/// VXLAN device name on each node when the kernel's VXLAN is installed.
pub const KERNEL_VXLAN_DEVICE: &str = "vxlan0";
/// UDP port of the kernel VXLAN baseline: 8472, Linux's historical default
/// (as Flannel uses), kept off 4789 so it never meets Veil's own overlay on
/// the same underlay.
pub const KERNEL_VXLAN_PORT: u16 = 8472;

/// Address of node `node` on the kernel VXLAN overlay (198.18.1.`node`/24).
pub fn kernel_vxlan_ip(node: usize) -> std::net::Ipv4Addr {
    let underlay = addressing::node_underlay_ip(node).octets();
    std::net::Ipv4Addr::new(198, 18, 1, underlay[3])
}

impl Topology {
    /// Routes `a` ↔ `b` over the underlay with plain routes (no encapsulation).
    pub fn route_pair_direct(&self, a: PodRef, b: PodRef) -> Result<()> {
        self.route_pair(a, b, "ul0", addressing::node_underlay_ip)
    }

    /// Routes each pod's /32 on the other's node via `next_hop(pod's node)` on `device`.
    fn route_pair(
        &self,
        a: PodRef,
        b: PodRef,
        device: &str,
        next_hop: fn(usize) -> std::net::Ipv4Addr,
    ) -> Result<()> {
        for (from, to) in [(a, b), (b, a)] {
            self.node(from.node).ip(&[
                "route",
                "replace",
                &format!("{}/32", to.ip()),
                "via",
                &next_hop(to.node).to_string(),
                "dev",
                device,
            ])?;
        }
        Ok(())
    }

    /// Creates a VXLAN device (`vxlan0`, VNI `vni`) on every node,
    /// with a flood entry per peer node, as a static kernel configuration
    /// would. Its MTU is the pods' MTU; its UDP port is [`KERNEL_VXLAN_PORT`].
    pub fn install_kernel_vxlan(&self, vni: u32) -> Result<()> {
        let nodes = self.spec().nodes;
        let mtu = self.spec().pod_mtu().to_string();
        for node in 1..=nodes {
            let ns = self.node(node);
            ns.ip(&[
                "link",
                "add",
                KERNEL_VXLAN_DEVICE,
                "type",
                "vxlan",
                "id",
                &vni.to_string(),
                "local",
                &addressing::node_underlay_ip(node).to_string(),
                "dev",
                "ul0",
                "dstport",
                &KERNEL_VXLAN_PORT.to_string(),
                "nolearning",
            ])?;
            ns.ip(&["link", "set", KERNEL_VXLAN_DEVICE, "mtu", &mtu, "up"])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", kernel_vxlan_ip(node)),
                "dev",
                KERNEL_VXLAN_DEVICE,
            ])?;
            for peer in (1..=nodes).filter(|&p| p != node) {
                crate::command::run(
                    "bridge",
                    &[
                        "-n",
                        ns.name(),
                        "fdb",
                        "append",
                        "00:00:00:00:00:00",
                        "dev",
                        KERNEL_VXLAN_DEVICE,
                        "dst",
                        &addressing::node_underlay_ip(peer).to_string(),
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Routes `a` ↔ `b` through the kernel VXLAN device (see [`Self::install_kernel_vxlan`]).
    pub fn route_pair_kernel_vxlan(&self, a: PodRef, b: PodRef) -> Result<()> {
        self.route_pair(a, b, KERNEL_VXLAN_DEVICE, kernel_vxlan_ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vxlan_addresses_are_a_separate_test_subnet() {
        assert_eq!(kernel_vxlan_ip(2), std::net::Ipv4Addr::new(198, 18, 1, 2));
        assert_ne!(kernel_vxlan_ip(2), addressing::node_underlay_ip(2));
    }
}
