//! The overlay's maps and the event counters, shared by both programs.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, PerCpuArray},
};
use veil_common::overlay::{
    DATAPATH_EVENT_COUNT, DatapathEvent, LocalEndpoint, MAX_LOCAL_ENDPOINTS, MAX_MESH_PEERS,
    MAX_NODE_ROUTES, MAX_PLAINTEXT_VERDICTS, MAX_PORT_MODES, MAX_SAME_NODE_VERDICTS, OverlayConfig,
    PortKey, RemoteNode, SameNodeKey, VERDICT_DENY,
};

/// This node's settings; index 0. Empty (all zero) until the agent writes it.
#[map(name = "OVERLAY_CONFIG")]
pub static OVERLAY_CONFIG: Array<OverlayConfig> = Array::with_max_entries(1, 0);

/// Pod CIDR (or a moved pod's /32) → the node that owns it.
#[map(name = "NODE_ROUTES")]
pub static NODE_ROUTES: LpmTrie<[u8; 4], RemoteNode> =
    LpmTrie::with_max_entries(MAX_NODE_ROUTES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Pods on this node, by address.
#[map(name = "LOCAL_ENDPOINTS")]
static LOCAL_ENDPOINTS: HashMap<[u8; 4], LocalEndpoint> =
    HashMap::with_max_entries(MAX_LOCAL_ENDPOINTS, 0);

/// Redirect targets for decapsulated packets: pod veth ifindex → itself.
#[map(name = "POD_DEVICES")]
pub static POD_DEVICES: DevMapHash = DevMapHash::with_max_entries(MAX_LOCAL_ENDPOINTS, 0);

/// Meshed pods on other nodes, by address → their mTLS mode. TCP from a
/// meshed local pod to one of these goes through the agents.
#[map(name = "MESH_PEERS")]
pub static MESH_PEERS: HashMap<[u8; 4], u32> = HashMap::with_max_entries(MAX_MESH_PEERS, 0);

/// Port-level mTLS modes, overriding the pod's own mode on that port.
#[map(name = "PORT_MODES")]
static PORT_MODES: HashMap<PortKey, u32> = HashMap::with_max_entries(MAX_PORT_MODES, 0);

/// Allow-rule verdicts for meshed pods of this node connecting to each
/// other: an entry per port the rules name, and port 0 for the rest. No
/// entry: admitted.
#[map(name = "SAME_NODE_VERDICTS")]
static SAME_NODE_VERDICTS: HashMap<SameNodeKey, u32> =
    HashMap::with_max_entries(MAX_SAME_NODE_VERDICTS, 0);

/// Allow-rule verdicts for plaintext TCP (which proves no identity) to
/// meshed pods of this node: an entry per port, and port 0 for the rest.
/// No entry: admitted.
#[map(name = "PLAINTEXT_VERDICTS")]
static PLAINTEXT_VERDICTS: HashMap<PortKey, u32> =
    HashMap::with_max_entries(MAX_PLAINTEXT_VERDICTS, 0);

#[map(name = "DATAPATH_EVENTS")]
static DATAPATH_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DATAPATH_EVENT_COUNT, 0);

/// Counts one packet under `event`.
#[inline(always)]
pub fn count_event(event: DatapathEvent) {
    if let Some(counter) = DATAPATH_EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: a per-CPU slot, written only by this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

/// The node's overlay settings, if the agent has written them.
#[inline(always)]
pub fn overlay_config() -> Option<&'static OverlayConfig> {
    let config = OVERLAY_CONFIG.get(0)?;
    (config.underlay_ifindex != 0).then_some(config)
}

/// A copy of the local endpoint at `address`, if the pod lives on this node.
#[inline(always)]
pub fn local_endpoint(address: &[u8; 4]) -> Option<LocalEndpoint> {
    // SAFETY: the pointer comes from a successful lookup and is read at once;
    // a concurrent update can at worst give a mix of old and new values of
    // plain integers, which the agent avoids by writing whole entries.
    LOCAL_ENDPOINTS
        .get_ptr(address)
        .map(|entry| unsafe { *entry })
}

/// The mTLS mode of `address`'s TCP port `port_be` (network byte order):
/// the port's own setting if it has one, else `pod_mode`.
#[inline(always)]
pub fn port_mode(address: &[u8; 4], port_be: u16, pod_mode: u32) -> u32 {
    let key = PortKey {
        ip: *address,
        port_be,
        _pad: 0,
    };
    // SAFETY: the pointer comes from a successful lookup and is read at once.
    PORT_MODES
        .get_ptr(&key)
        .map_or(pod_mode, |mode| unsafe { *mode })
}

/// Whether the allow rules refuse `source` → `destination`'s TCP port
/// `port_be` (network byte order), two meshed pods of this node.
#[inline(always)]
pub fn same_node_denied(source: &[u8; 4], destination: &[u8; 4], port_be: u16) -> bool {
    let key = SameNodeKey {
        source: *source,
        destination: *destination,
        port_be,
        _pad: 0,
    };
    refused_on_port(&SAME_NODE_VERDICTS, key, |key| &mut key.port_be)
}

/// Whether the allow rules refuse plaintext TCP to `destination`'s port
/// `port_be` (network byte order), a meshed pod of this node.
#[inline(always)]
pub fn plaintext_denied(destination: &[u8; 4], port_be: u16) -> bool {
    let key = PortKey {
        ip: *destination,
        port_be,
        _pad: 0,
    };
    refused_on_port(&PLAINTEXT_VERDICTS, key, |key| &mut key.port_be)
}

/// Whether a verdict table refuses `key`: the port's own verdict if it has
/// one, else the verdict for every port (the key with port 0).
#[inline(always)]
fn refused_on_port<K>(table: &HashMap<K, u32>, mut key: K, port: fn(&mut K) -> &mut u16) -> bool {
    // SAFETY: the pointers come from successful lookups and are read at once.
    if let Some(verdict) = table.get_ptr(&key) {
        return unsafe { *verdict } == VERDICT_DENY;
    }
    *port(&mut key) = 0;
    table
        .get_ptr(&key)
        .is_some_and(|verdict| unsafe { *verdict } == VERDICT_DENY)
}
