//! Maps of the VXLAN overlay: where remote pods live, which pods are local,
//! and what the programs did with each packet.
//!
//! Addresses are stored in network byte order (`[u8; 4]`), exactly as they
//! appear in packets, so the programs never swap bytes on the hot path.

/// UDP port of VXLAN (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// Bytes VXLAN over IPv4 adds: outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8.
pub const VXLAN_OVERHEAD: u32 = 50;
/// Outer UDP source ports are taken from this range (RFC 7348 §5), by flow hash.
pub const SOURCE_PORT_BASE: u16 = 49152;
/// Mask applied to the flow hash to pick a port inside the range.
pub const SOURCE_PORT_MASK: u16 = 0x3fff;

/// Largest number of remote node routes (pod CIDRs and moved pods).
pub const MAX_NODE_ROUTES: u32 = 4096;
/// Largest number of pods on one node.
pub const MAX_LOCAL_ENDPOINTS: u32 = 1024;

/// This node's overlay settings (single-entry array, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlayConfig {
    /// VXLAN network identifier (24 bits).
    pub vni: u32,
    /// Interface index of the underlay.
    pub underlay_ifindex: u32,
    /// MTU of the underlay; encapsulated frames larger than this are refused.
    pub underlay_mtu: u32,
    /// This node's underlay address.
    pub underlay_ip: [u8; 4],
    /// This node's underlay MAC (outer source MAC).
    pub underlay_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// A collect_md (`external`) vxlan device that encapsulates instead of
    /// the program (`encapsulation = "vxlan-device"`); 0: the program
    /// encapsulates itself.
    pub tunnel_ifindex: u32,
}

/// Not meshed: the pod's traffic is never intercepted (plaintext overlay).
pub const MESH_MODE_DISABLED: u32 = 0;
/// Meshed; accepts both mTLS (through the agents) and plaintext.
pub const MESH_MODE_PERMISSIVE: u32 = 1;
/// Meshed; plaintext TCP from outside the mesh is dropped.
pub const MESH_MODE_STRICT: u32 = 2;

/// The agent's transparent listener for intercepted outbound connections.
pub const OUTBOUND_PROXY_PORT: u16 = 15001;
/// Packet mark the pod-egress program sets on intercepted packets; a policy
/// routing rule sends marked packets to a `local` route, so the node delivers
/// them to the agent's socket instead of forwarding them.
pub const MESH_MARK: u32 = 0x5e11;
/// Largest number of meshed pods on other nodes.
pub const MAX_MESH_PEERS: u32 = 65536;
/// Largest number of port-level mTLS modes (pod address and port).
pub const MAX_PORT_MODES: u32 = 16384;

/// Key of the port-level mode table: a pod's address and a TCP port, both as
/// on the wire (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub ip: [u8; 4],
    /// Big-endian, as in the TCP header.
    pub port_be: u16,
    pub _pad: u16,
}

/// Largest number of same-node authorization verdicts.
pub const MAX_SAME_NODE_VERDICTS: u32 = 65536;
/// Largest number of plaintext verdicts (local pod address and port).
pub const MAX_PLAINTEXT_VERDICTS: u32 = 16384;
/// An allow-rule verdict that admits (an exception, on one port, to a
/// [`VERDICT_DENY`] for every port).
pub const VERDICT_ALLOW: u32 = 0;
/// An allow-rule verdict that refuses.
pub const VERDICT_DENY: u32 = 1;

/// Key of the same-node authorization table: a meshed local pod connecting
/// to another on `port_be` (network byte order; 0 = every port without an
/// entry of its own).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SameNodeKey {
    pub source: [u8; 4],
    pub destination: [u8; 4],
    pub port_be: u16,
    pub _pad: u16,
}

/// Value of the node route table (an LPM trie keyed by pod CIDR or pod /32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteNode {
    /// The node's underlay address (outer destination).
    pub underlay_ip: [u8; 4],
    /// The node's underlay MAC (outer destination MAC; nodes share an L2 underlay).
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Value of the local endpoint table, keyed by pod address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// Host-side veth of the pod.
    pub ifindex: u32,
    /// The pod's own MAC (inner destination MAC after decapsulation).
    pub pod_mac: [u8; 6],
    /// MAC of the host-side veth (inner source MAC after decapsulation).
    pub host_mac: [u8; 6],
    /// Workload identity slot (0 = none yet; reserved for policy in the datapath).
    pub identity: u32,
    /// The pod's mTLS mode: [`MESH_MODE_DISABLED`], [`MESH_MODE_PERMISSIVE`] or [`MESH_MODE_STRICT`].
    pub mode: u32,
}

/// Marks a [`DeliveryTag`] ("veil" in ASCII).
pub const DELIVERY_TAG_MAGIC: u32 = 0x7665_696c;

/// What underlay XDP writes in a decapsulated frame's metadata area (in
/// front of the frame, native byte order) so that TC ingress on the
/// underlay can hand the packet, once GRO has merged it, to its pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeliveryTag {
    /// [`DELIVERY_TAG_MAGIC`].
    pub magic: u32,
    /// The pod's host-side veth; its peer is the pod's interface.
    pub ifindex: u32,
}

/// What the programs did with a packet; index into the per-CPU event counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatapathEvent {
    /// Pod egress: encapsulated toward a remote node.
    Encapsulated = 0,
    /// Underlay ingress: decapsulated and redirected into a local pod.
    Decapsulated = 1,
    /// Pod egress to a pod on the same node: left to the kernel, never encapsulated.
    SameNode = 2,
    /// Pod egress to an address no node owns: left to the kernel.
    NoOverlayRoute = 3,
    /// Underlay ingress that is not VXLAN: passed untouched.
    NotOverlay = 4,
    DropTruncated = 5,
    DropMalformed = 6,
    DropWrongVni = 7,
    DropUnknownDestination = 8,
    DropInnerNotIpv4 = 9,
    DropEncapFailed = 10,
    DropTooBig = 11,
    /// Pod egress: a meshed pod's new TCP connection to a meshed pod on
    /// another node, handed to the agent's transparent listener.
    MeshSteered = 12,
    /// Pod egress: a packet of an intercepted flow, delivered to the agent's socket.
    MeshFlow = 13,
    /// Pod egress: a meshed connection that no agent listener could take
    /// (the agent is not running); dropped, never sent in plaintext.
    DropNoProxy = 14,
    /// Plaintext TCP from outside the mesh to a STRICT pod.
    DropPlaintextToStrict = 15,
    /// Pod egress: a meshed pod's new TCP connection to a meshed pod on the
    /// same node that the allow rules refuse, handed to the agent's
    /// listener to be refused with a reset.
    MeshSameNodeDenied = 16,
    /// Plaintext TCP (no proven identity) to a pod's port that allow rules
    /// select: only the sources they name are admitted, through mTLS.
    DropPlaintextUnauthorized = 17,
    /// Underlay ingress, `lookup` delivery: a frame that is not VXLAN yet
    /// addressed, MAC and IP, to a local pod as if XDP had decapsulated it.
    /// Only our own decapsulation may hand frames to pods.
    DropForgedDelivery = 18,
}

/// Number of [`DatapathEvent`] values (size of the event counter array).
pub const DATAPATH_EVENT_COUNT: u32 = 19;

impl DatapathEvent {
    pub const ALL: [DatapathEvent; DATAPATH_EVENT_COUNT as usize] = [
        Self::Encapsulated,
        Self::Decapsulated,
        Self::SameNode,
        Self::NoOverlayRoute,
        Self::NotOverlay,
        Self::DropTruncated,
        Self::DropMalformed,
        Self::DropWrongVni,
        Self::DropUnknownDestination,
        Self::DropInnerNotIpv4,
        Self::DropEncapFailed,
        Self::DropTooBig,
        Self::MeshSteered,
        Self::MeshFlow,
        Self::DropNoProxy,
        Self::DropPlaintextToStrict,
        Self::MeshSameNodeDenied,
        Self::DropPlaintextUnauthorized,
        Self::DropForgedDelivery,
    ];

    /// Name shown by `veilctl` and in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Encapsulated => "encapsulated",
            Self::Decapsulated => "decapsulated",
            Self::SameNode => "same-node",
            Self::NoOverlayRoute => "no-overlay-route",
            Self::NotOverlay => "not-overlay",
            Self::DropTruncated => "drop-truncated",
            Self::DropMalformed => "drop-malformed",
            Self::DropWrongVni => "drop-wrong-vni",
            Self::DropUnknownDestination => "drop-unknown-destination",
            Self::DropInnerNotIpv4 => "drop-inner-not-ipv4",
            Self::DropEncapFailed => "drop-encap-failed",
            Self::DropTooBig => "drop-too-big",
            Self::MeshSteered => "mesh-steered",
            Self::MeshFlow => "mesh-flow",
            Self::DropNoProxy => "drop-no-proxy",
            Self::DropPlaintextToStrict => "drop-plaintext-to-strict",
            Self::MeshSameNodeDenied => "mesh-same-node-denied",
            Self::DropPlaintextUnauthorized => "drop-plaintext-unauthorized",
            Self::DropForgedDelivery => "drop-forged-delivery",
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Self::DropTruncated
                | Self::DropMalformed
                | Self::DropWrongVni
                | Self::DropUnknownDestination
                | Self::DropInnerNotIpv4
                | Self::DropEncapFailed
                | Self::DropTooBig
                | Self::DropNoProxy
                | Self::DropPlaintextToStrict
                | Self::DropPlaintextUnauthorized
                | Self::DropForgedDelivery
        )
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]`, `Copy`, integers and byte arrays only, explicit
    // padding fields: every bit pattern is a valid value.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::OverlayConfig {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::RemoteNode {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::LocalEndpoint {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::PortKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::SameNodeKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<OverlayConfig>(), 28);
        assert_eq!(core::mem::size_of::<RemoteNode>(), 12);
        assert_eq!(core::mem::size_of::<LocalEndpoint>(), 24);
        assert_eq!(core::mem::size_of::<SameNodeKey>(), 12);
    }

    #[test]
    fn events_are_indexed_by_their_value_and_named_uniquely() {
        for (i, event) in DatapathEvent::ALL.iter().enumerate() {
            assert_eq!(*event as usize, i);
            assert!(
                DatapathEvent::ALL[i + 1..]
                    .iter()
                    .all(|e| e.name() != event.name())
            );
        }
        assert!(DatapathEvent::DropTruncated.is_drop());
        assert!(!DatapathEvent::NotOverlay.is_drop());
    }
}
