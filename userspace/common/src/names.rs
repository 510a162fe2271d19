//! Names of the programs and maps in the eBPF object.
//!
//! The agent looks programs and maps up by these names; keeping them in one
//! place means a rename fails to compile instead of failing at load time.

/// XDP program on each node's underlay interface.
pub const PROG_UNDERLAY_INGRESS: &str = "veil_underlay_ingress";
/// TC ingress program on the underlay: hands decapsulated, GRO-merged
/// packets to their pod.
pub const PROG_UNDERLAY_DELIVER: &str = "veil_underlay_deliver";
/// TC program on the host side of each pod's veth (the pod's egress).
pub const PROG_POD_EGRESS: &str = "veil_pod_egress";
/// `sk_lookup` program in the node's network namespace: gives a new meshed
/// SYN that met an old connection's TIME_WAIT to the agent's listener.
pub const PROG_MESH_TIME_WAIT: &str = "veil_mesh_time_wait";

/// Per-CPU hash of [`crate::counters::CounterKey`] → [`crate::counters::PacketCounters`].
pub const MAP_INTERFACE_COUNTERS: &str = "INTERFACE_COUNTERS";

/// Single-entry array of [`crate::overlay::OverlayConfig`].
pub const MAP_OVERLAY_CONFIG: &str = "OVERLAY_CONFIG";
/// LPM trie: pod CIDR (or moved pod /32) → [`crate::overlay::RemoteNode`].
pub const MAP_NODE_ROUTES: &str = "NODE_ROUTES";
/// Hash: pod address → [`crate::overlay::LocalEndpoint`].
pub const MAP_LOCAL_ENDPOINTS: &str = "LOCAL_ENDPOINTS";
/// Device map (hash): pod veth ifindex → itself, the XDP redirect targets.
pub const MAP_POD_DEVICES: &str = "POD_DEVICES";
/// Hash: meshed pod address on another node → its mTLS mode.
pub const MAP_MESH_PEERS: &str = "MESH_PEERS";
/// Hash: [`crate::overlay::PortKey`] → the mTLS mode of that pod's port,
/// where a port-level setting overrides the workload's.
pub const MAP_PORT_MODES: &str = "PORT_MODES";
/// Hash: [`crate::overlay::SameNodeKey`] → whether the allow rules admit
/// that same-node connection ([`crate::overlay::VERDICT_DENY`] or
/// [`crate::overlay::VERDICT_ALLOW`]); no entry: admitted.
pub const MAP_SAME_NODE_VERDICTS: &str = "SAME_NODE_VERDICTS";
/// Hash: [`crate::overlay::PortKey`] of a meshed local pod (port 0 for
/// every port without an entry of its own) → whether plaintext TCP, which
/// proves no identity, is refused there by allow rules
/// ([`crate::overlay::VERDICT_DENY`]) or not ([`crate::overlay::VERDICT_ALLOW`]);
/// no entry: admitted.
pub const MAP_PLAINTEXT_VERDICTS: &str = "PLAINTEXT_VERDICTS";
/// Per-CPU array of packet counts per [`crate::overlay::DatapathEvent`].
pub const MAP_DATAPATH_EVENTS: &str = "DATAPATH_EVENTS";
/// Sock map, index 0: the agent's transparent outbound listener.
pub const MAP_MESH_LISTENER: &str = "MESH_LISTENER";

/// Trivial XDP program (passes everything) the agent attaches to `lo` for a
/// moment to learn whether this kernel attaches XDP through a bpf_link.
pub const PROG_PROBE_XDP: &str = "veil_probe_xdp";
/// Trivial TC program (lets everything through) the agent attaches to `lo`
/// for a moment to learn whether this kernel has tcx.
pub const PROG_PROBE_TC: &str = "veil_probe_tc";
