//! The address plan: every test address comes from 198.18.0.0/15.
//!
//! - underlay: 198.18.0.0/24, node `n` is 198.18.0.`n`;
//! - pods: node `n` owns 198.19.`n`.0/24, pod `p` on it is 198.19.`n`.`p`/32;
//! - each node answers as 198.19.`n`.254 on its pod veths (the pods' gateway).
//!
//! Node and pod numbers start at 1, as people count them.

use std::net::Ipv4Addr;

/// Largest number of nodes (and of pods per node) the plan has room for.
pub const MAX_NODES: usize = 250;
/// Largest number of pods per node.
pub const MAX_PODS_PER_NODE: usize = 250;
/// The whole test range; pods route it via their gateway.
pub const TEST_RANGE: &str = "198.18.0.0/15";
/// Prefix length of the underlay subnet.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// Bytes of VXLAN over IPv4 overhead (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8).
pub const VXLAN_OVERHEAD: u32 = 50;

/// One pod of a topology: node number and pod number on that node, both from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodRef {
    pub node: usize,
    pub pod: usize,
}

impl PodRef {
    pub const fn new(node: usize, pod: usize) -> Self {
        Self { node, pod }
    }

    /// The pod's address.
    pub fn ip(self) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, octet(self.node), octet(self.pod))
    }

    /// Name of the pod's veth on its node (the host side).
    pub fn host_veth(self) -> String {
        format!("vp{}", self.pod)
    }
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "n{}p{}", self.node, self.pod)
    }
}

/// Node `node`'s underlay address.
pub fn node_underlay_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, octet(node))
}

/// The pod CIDR node `node` owns, as text (`198.19.n.0/24`).
pub fn node_pod_cidr(node: usize) -> String {
    format!("198.19.{}.0/24", octet(node))
}

/// The gateway address every pod on `node` routes through.
pub fn node_pod_gateway(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, octet(node), 254)
}

fn octet(n: usize) -> u8 {
    assert!(
        (1..=MAX_NODES).contains(&n),
        "node/pod number {n} is outside 1..={MAX_NODES}"
    );
    n as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_plan() {
        assert_eq!(node_underlay_ip(2), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(PodRef::new(2, 3).ip(), Ipv4Addr::new(198, 19, 2, 3));
        assert_eq!(node_pod_cidr(7), "198.19.7.0/24");
        assert_eq!(node_pod_gateway(1), Ipv4Addr::new(198, 19, 1, 254));
        assert_eq!(PodRef::new(1, 2).host_veth(), "vp2");
        assert_eq!(PodRef::new(1, 2).to_string(), "n1p2");
    }

    #[test]
    fn every_address_is_inside_the_benchmark_range() {
        let inside = |ip: Ipv4Addr| ip.octets()[0] == 198 && (ip.octets()[1] & 0xfe) == 18;
        for n in [1, 125, MAX_NODES] {
            assert!(inside(node_underlay_ip(n)));
            assert!(inside(node_pod_gateway(n)));
            assert!(inside(PodRef::new(n, MAX_PODS_PER_NODE).ip()));
        }
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn node_zero_is_refused() {
        node_underlay_ip(0);
    }
}
