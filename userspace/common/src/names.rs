//! Names of the programs and maps in the eBPF object.
//!
//! The agent looks programs and maps up by these names; keeping them in one
//! place means a rename fails to compile instead of failing at load time.

/// XDP program on each node's underlay interface.
pub const PROG_UNDERLAY_INGRESS: &str = "veil_underlay_ingress";
/// TC program on the host side of each pod's veth (the pod's egress).
pub const PROG_POD_EGRESS: &str = "veil_pod_egress";

/// Per-CPU hash of [`crate::counters::CounterKey`] → [`crate::counters::PacketCounters`].
pub const MAP_INTERFACE_COUNTERS: &str = "INTERFACE_COUNTERS";
