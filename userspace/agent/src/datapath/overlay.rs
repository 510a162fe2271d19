//! The overlay's maps: what the inventory says, turned into map entries, and
//! the smallest set of map writes that gets the kernel there.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::{
    Pod,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, lpm_trie::Key, lpm_trie::LpmTrie,
        xdp::DevMapHash,
    },
};
use veil_common::overlay::{
    DatapathEvent, LocalEndpoint, MESH_MODE_DISABLED, OverlayConfig, PortKey, RemoteNode,
    SameNodeKey, VERDICT_ALLOW, VERDICT_DENY,
};
use veil_identity::SpiffeId;

use super::links::LinkTable;
use crate::inventory::{Inventory, MeshMode};

/// Settings of this node's overlay that do not come from the inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlaySettings {
    pub node_name: String,
    pub vni: u32,
    pub underlay_interface: String,
    pub underlay_mtu: u32,
    /// The collect_md vxlan device that encapsulates (`encapsulation =
    /// "vxlan-device"`), or 0 when the pod-egress program does it.
    pub tunnel_ifindex: u32,
    /// The mesh's trust domain, when the agent runs the mesh: allow rules
    /// name sources by SPIFFE ID in it.
    pub trust_domain: Option<String>,
}

/// Everything the overlay maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlayPlan {
    pub config: OverlayConfig,
    /// (network, prefix length) → owner node.
    pub routes: BTreeMap<(Ipv4Addr, u8), RemoteNode>,
    pub endpoints: BTreeMap<Ipv4Addr, LocalEndpoint>,
    /// Meshed pods on other nodes → their mode: TCP to them is steered to the agent.
    pub mesh_peers: BTreeMap<Ipv4Addr, u32>,
    /// Port-level modes of meshed pods anywhere (they override the pod's mode).
    pub port_modes: BTreeMap<PortKey, u32>,
    /// Allow-rule verdicts between meshed pods of this node (see
    /// [`same_node_verdicts`]).
    pub same_node_verdicts: BTreeMap<SameNodeKey, u32>,
    /// Allow-rule verdicts for plaintext to meshed pods of this node (see
    /// [`plaintext_verdicts`]).
    pub plaintext_verdicts: BTreeMap<PortKey, u32>,
    /// Host-side veths of local pods (they get the pod-egress program).
    pub local_interfaces: BTreeSet<String>,
    /// Local pods left out because their veth does not exist (yet).
    pub warnings: Vec<String>,
}

/// Computes the maps' contents for `settings.node_name` from the inventory.
pub fn plan(
    inventory: &Inventory,
    settings: &OverlaySettings,
    links: &LinkTable,
) -> Result<OverlayPlan, String> {
    let me = inventory.node(&settings.node_name).ok_or_else(|| {
        format!(
            "this node ({}) is not in the inventory's [[nodes]]: add it, or fix node_name",
            settings.node_name
        )
    })?;
    let underlay = links.get(&settings.underlay_interface).ok_or_else(|| {
        format!(
            "underlay interface {} does not exist in this network namespace",
            settings.underlay_interface
        )
    })?;
    let mut plan = OverlayPlan {
        config: OverlayConfig {
            vni: settings.vni,
            underlay_ifindex: underlay.ifindex,
            underlay_mtu: settings.underlay_mtu,
            underlay_ip: me.underlay_ip.octets(),
            underlay_mac: underlay.mac,
            _pad: [0; 2],
            tunnel_ifindex: settings.tunnel_ifindex,
        },
        ..OverlayPlan::default()
    };
    let remote = |name: &str| {
        inventory.node(name).map(|node| RemoteNode {
            underlay_ip: node.underlay_ip.octets(),
            mac: node.underlay_mac.0,
            _pad: [0; 2],
        })
    };
    for node in inventory.nodes.iter().filter(|n| n.name != me.name) {
        if let Some(entry) = remote(&node.name) {
            plan.routes
                .insert((node.pod_cidr.address, node.pod_cidr.prefix_len), entry);
        }
    }
    for pod in &inventory.pods {
        let cidr_owner = inventory.nodes.iter().find(|n| n.pod_cidr.contains(pod.ip));
        let moved = cidr_owner.is_some_and(|owner| owner.name != pod.node);
        if pod.node == me.name {
            let Some(link) = links.get(&pod.interface) else {
                plan.warnings.push(format!(
                    "pod {} ({}): interface {} does not exist yet; left out",
                    pod.name, pod.ip, pod.interface
                ));
                continue;
            };
            plan.endpoints.insert(
                pod.ip,
                LocalEndpoint {
                    ifindex: link.ifindex,
                    pod_mac: pod.mac.0,
                    host_mac: link.mac,
                    identity: 0,
                    mode: inventory
                        .meshed(pod)
                        .map_or(MESH_MODE_DISABLED, |(_, mode)| mode.datapath_value()),
                },
            );
            plan.local_interfaces.insert(pod.interface.clone());
        } else if let Some((_, mode)) = inventory.meshed(pod) {
            plan.mesh_peers.insert(pod.ip, mode.datapath_value());
        }
        if let Some(mesh) = &pod.mesh {
            for (port, mode) in inventory.policy.port_modes(mesh.workload()) {
                let key = PortKey {
                    ip: pod.ip.octets(),
                    port_be: port.to_be(),
                    _pad: 0,
                };
                plan.port_modes.insert(key, mode.datapath_value());
            }
        }
        if pod.node != me.name && moved {
            // The pod left the node that owns its CIDR: a /32 beats the /24.
            if let Some(entry) = remote(&pod.node) {
                plan.routes.insert((pod.ip, 32), entry);
            }
        }
    }
    if let Some(trust_domain) = &settings.trust_domain {
        plan.same_node_verdicts = same_node_verdicts(inventory, &me.name, trust_domain);
        plan.plaintext_verdicts = plaintext_verdicts(inventory, &me.name);
    }
    Ok(plan)
}

/// The allow rules' verdicts for plaintext TCP to meshed pods of `node`.
///
/// Plaintext proves no identity, so a port that a rule selects refuses it
/// (whatever the mode: PERMISSIVE admits plaintext only where no rule
/// asks who the client is); a DISABLE port has the mesh, rules included,
/// turned off. Per pod: the verdict for ports no rule names (port 0) when
/// it refuses, and each named or DISABLE port whose verdict differs. The
/// underlay's XDP applies them to overlay traffic, the pod-egress program
/// to a non-meshed pod of this node.
fn plaintext_verdicts(inventory: &Inventory, node: &str) -> BTreeMap<PortKey, u32> {
    let mut verdicts = BTreeMap::new();
    for pod in inventory.pods.iter().filter(|pod| pod.node == node) {
        let Some((mesh, _)) = inventory.meshed(pod) else {
            continue;
        };
        let workload = mesh.workload();
        let Some(mut ports) = inventory.policy.ports_with_allow_rules(workload) else {
            continue;
        };
        ports.extend(inventory.policy.port_modes(workload).map(|(port, _)| port));
        let verdict = |port: u16| {
            let disabled = port != 0
                && inventory
                    .policy
                    .effective_mode(workload, mesh.mode, Some(port))
                    .mode
                    == MeshMode::Disable;
            if disabled || inventory.policy.authorize(workload, port, "", "").is_ok() {
                VERDICT_ALLOW
            } else {
                VERDICT_DENY
            }
        };
        let key = |port: u16| PortKey {
            ip: pod.ip.octets(),
            port_be: port.to_be(),
            _pad: 0,
        };
        insert_port_verdicts(&mut verdicts, &ports, verdict, key);
    }
    verdicts
}

/// Writes one destination's verdicts in the tables' form: the verdict for
/// every port no rule names (port 0) when it refuses, then each of `ports`
/// whose verdict differs from it.
fn insert_port_verdicts<K: Ord>(
    verdicts: &mut BTreeMap<K, u32>,
    ports: &BTreeSet<u16>,
    verdict: impl Fn(u16) -> u32,
    key: impl Fn(u16) -> K,
) {
    let other_ports = verdict(0);
    if other_ports == VERDICT_DENY {
        verdicts.insert(key(0), VERDICT_DENY);
    }
    for &port in ports {
        let on_port = verdict(port);
        if on_port != other_ports {
            verdicts.insert(key(port), on_port);
        }
    }
}

/// The allow rules' verdicts for connections between meshed pods of `node`.
///
/// Such a connection never reaches an agent (it stays plaintext on the
/// node), so the pod-egress program decides it from these: per (source,
/// destination) pair, the verdict for the ports no rule names (port 0) when
/// it refuses, and each port a rule names whose verdict differs from that.
/// Computed with [`crate::policy::Policy::authorize`], the function the
/// agents apply after a handshake, so both paths decide alike.
fn same_node_verdicts(
    inventory: &Inventory,
    node: &str,
    trust_domain: &str,
) -> BTreeMap<SameNodeKey, u32> {
    let meshed: Vec<_> = inventory
        .pods
        .iter()
        .filter(|pod| pod.node == node)
        .filter_map(|pod| Some((pod, inventory.meshed(pod)?.0)))
        .collect();
    let mut verdicts = BTreeMap::new();
    for &(destination, to) in &meshed {
        let workload = to.workload();
        let Some(named_ports) = inventory.policy.ports_with_allow_rules(workload) else {
            continue; // no rule selects it: everything is allowed
        };
        for &(source, from) in meshed.iter().filter(|(p, _)| p.ip != destination.ip) {
            let Ok(identity) = SpiffeId::new(trust_domain, &from.namespace, &from.service_account)
            else {
                continue;
            };
            let identity = identity.to_string();
            let verdict = |port: u16| match inventory.policy.authorize(
                workload,
                port,
                &identity,
                &from.namespace,
            ) {
                Ok(()) => VERDICT_ALLOW,
                Err(_) => VERDICT_DENY,
            };
            let key = |port: u16| SameNodeKey {
                source: source.ip.octets(),
                destination: destination.ip.octets(),
                port_be: port.to_be(),
                _pad: 0,
            };
            insert_port_verdicts(&mut verdicts, &named_ports, verdict, key);
        }
    }
    verdicts
}

/// Brings a hash map to `wanted`: writes new and changed entries, then
/// removes the ones `wanted` lacks.
fn sync_hash_map<K: Pod + Ord, V: Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    wanted: &BTreeMap<K, V>,
    stats: &mut ApplyStats,
) -> Result<(), MapError> {
    let current: BTreeMap<K, V> = map.iter().collect::<Result<_, _>>()?;
    for (key, value) in wanted {
        if current.get(key) != Some(value) {
            map.insert(key, value, 0)?;
            stats.written += 1;
        }
    }
    for key in current.keys().filter(|key| !wanted.contains_key(key)) {
        map.remove(key)?;
        stats.removed += 1;
    }
    Ok(())
}

/// The overlay maps of the loaded object.
pub struct OverlayMaps {
    pub(super) config: Array<MapData, OverlayConfig>,
    pub(super) routes: LpmTrie<MapData, [u8; 4], RemoteNode>,
    pub(super) endpoints: HashMap<MapData, [u8; 4], LocalEndpoint>,
    pub(super) devices: DevMapHash<MapData>,
    pub(super) mesh_peers: HashMap<MapData, [u8; 4], u32>,
    pub(super) port_modes: HashMap<MapData, PortKey, u32>,
    pub(super) same_node_verdicts: HashMap<MapData, SameNodeKey, u32>,
    pub(super) plaintext_verdicts: HashMap<MapData, PortKey, u32>,
    pub(super) events: PerCpuArray<MapData, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum OverlayMapError {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("device map: {0}")]
    Device(#[from] aya::maps::xdp::XdpMapError),
}

/// What one apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub written: usize,
    pub removed: usize,
}

impl OverlayMaps {
    /// Brings the maps to `plan`: writes new and changed entries first, then
    /// removes stale ones, so no packet ever finds a gap.
    pub fn apply(&mut self, plan: &OverlayPlan) -> Result<ApplyStats, OverlayMapError> {
        let mut stats = ApplyStats::default();
        if self.config.get(&0, 0)? != plan.config {
            self.config.set(0, plan.config, 0)?;
            stats.written += 1;
        }

        let current_devices: BTreeSet<u32> = self.devices.keys().collect::<Result<_, _>>()?;
        let wanted_devices: BTreeSet<u32> = plan.endpoints.values().map(|e| e.ifindex).collect();
        for &ifindex in wanted_devices.difference(&current_devices) {
            self.devices.insert(ifindex, ifindex, None, 0)?;
            stats.written += 1;
        }

        let current_endpoints: BTreeMap<[u8; 4], LocalEndpoint> =
            self.endpoints.iter().collect::<Result<_, _>>()?;
        for (ip, endpoint) in &plan.endpoints {
            if current_endpoints.get(&ip.octets()) != Some(endpoint) {
                self.endpoints.insert(ip.octets(), endpoint, 0)?;
                stats.written += 1;
            }
        }
        let current_routes: BTreeMap<(Ipv4Addr, u8), RemoteNode> = self
            .routes
            .iter()
            .map(|entry| {
                entry
                    .map(|(key, node)| ((Ipv4Addr::from(key.data()), key.prefix_len() as u8), node))
            })
            .collect::<Result<_, _>>()?;
        for (&(network, prefix_len), node) in &plan.routes {
            if current_routes.get(&(network, prefix_len)) != Some(node) {
                self.routes
                    .insert(&Key::new(u32::from(prefix_len), network.octets()), node, 0)?;
                stats.written += 1;
            }
        }

        let peers: BTreeMap<[u8; 4], u32> = plan
            .mesh_peers
            .iter()
            .map(|(ip, mode)| (ip.octets(), *mode))
            .collect();
        sync_hash_map(&mut self.mesh_peers, &peers, &mut stats)?;
        sync_hash_map(&mut self.port_modes, &plan.port_modes, &mut stats)?;
        sync_hash_map(
            &mut self.same_node_verdicts,
            &plan.same_node_verdicts,
            &mut stats,
        )?;
        sync_hash_map(
            &mut self.plaintext_verdicts,
            &plan.plaintext_verdicts,
            &mut stats,
        )?;

        for &(network, prefix_len) in current_routes.keys() {
            if !plan.routes.contains_key(&(network, prefix_len)) {
                self.routes
                    .remove(&Key::new(u32::from(prefix_len), network.octets()))?;
                stats.removed += 1;
            }
        }
        for ip in current_endpoints.keys() {
            if !plan.endpoints.contains_key(&Ipv4Addr::from(*ip)) {
                self.endpoints.remove(ip)?;
                stats.removed += 1;
            }
        }
        for &ifindex in current_devices.difference(&wanted_devices) {
            self.devices.remove(ifindex)?;
            stats.removed += 1;
        }
        Ok(stats)
    }

    /// Packets per datapath event, summed over CPUs.
    pub fn events(&self) -> Result<Vec<(DatapathEvent, u64)>, MapError> {
        DatapathEvent::ALL
            .iter()
            .map(|&event| {
                let per_cpu = self.events.get(&(event as u32), 0)?;
                Ok((event, per_cpu.iter().sum()))
            })
            .collect()
    }

    pub fn config(&self) -> Result<OverlayConfig, MapError> {
        self.config.get(&0, 0)
    }

    pub fn routes(&self) -> Result<Vec<(Ipv4Addr, u8, RemoteNode)>, MapError> {
        self.routes
            .iter()
            .map(|entry| {
                entry.map(|(key, node)| (Ipv4Addr::from(key.data()), key.prefix_len() as u8, node))
            })
            .collect()
    }

    pub fn endpoints(&self) -> Result<Vec<(Ipv4Addr, LocalEndpoint)>, MapError> {
        self.endpoints
            .iter()
            .map(|entry| entry.map(|(ip, endpoint)| (Ipv4Addr::from(ip), endpoint)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::datapath::links::Link;
    use veil_common::overlay::MESH_MODE_STRICT;

    fn inventory(extra_pods: &str) -> Inventory {
        let n2p1 = r#"
[[pods]]
name = "n2p1"
node = "node2"
ip = "198.19.2.1"
mac = "02:00:00:00:02:01"
interface = "vp1"
"#;
        Inventory::parse(
            &format!("{}{n2p1}{extra_pods}", crate::inventory::tests::GOOD),
            Path::new("inventory.toml"),
        )
        .unwrap()
    }

    fn settings() -> OverlaySettings {
        OverlaySettings {
            node_name: "node1".into(),
            vni: 42,
            underlay_interface: "ul0".into(),
            underlay_mtu: 1500,
            tunnel_ifindex: 0,
            trust_domain: Some("cluster.local".into()),
        }
    }

    fn links() -> LinkTable {
        LinkTable::from([
            (
                "ul0".to_string(),
                Link {
                    ifindex: 2,
                    mac: [2, 0, 0, 0, 0, 1],
                },
            ),
            (
                "vp1".to_string(),
                Link {
                    ifindex: 3,
                    mac: [2, 0, 0, 0, 0xaa, 1],
                },
            ),
        ])
    }

    #[test]
    fn remote_cidrs_become_routes_and_local_pods_endpoints() {
        let plan = plan(&inventory(""), &settings(), &links()).unwrap();
        assert_eq!(plan.config.vni, 42);
        assert_eq!(plan.config.underlay_ifindex, 2);
        assert_eq!(plan.config.underlay_ip, [198, 18, 0, 1]);
        let route = plan.routes[&("198.19.2.0".parse().unwrap(), 24)];
        assert_eq!(route.underlay_ip, [198, 18, 0, 2]);
        assert_eq!(route.mac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(plan.routes.len(), 1, "no route to our own CIDR");
        let endpoint = plan.endpoints[&"198.19.1.1".parse().unwrap()];
        assert_eq!(
            (endpoint.ifindex, endpoint.host_mac),
            (3, [2, 0, 0, 0, 0xaa, 1])
        );
        assert_eq!(endpoint.pod_mac, [2, 0, 0, 0, 1, 1]);
        assert_eq!(plan.local_interfaces, BTreeSet::from(["vp1".to_string()]));
    }

    #[test]
    fn a_moved_pod_gets_a_host_route_on_other_nodes() {
        let moved = r#"
[[pods]]
name = "n1p2"
node = "node2"
ip = "198.19.1.2"
mac = "02:00:00:00:01:02"
interface = "v1p2"
"#;
        let plan = plan(&inventory(moved), &settings(), &links()).unwrap();
        let route = plan.routes[&("198.19.1.2".parse().unwrap(), 32)];
        assert_eq!(route.underlay_ip, [198, 18, 0, 2]);
    }

    #[test]
    fn meshed_pods_get_their_effective_modes_and_port_overrides() {
        let meshed = r#"
[pods.mesh]
namespace = "shop"
service_account = "checkout"

[policy]
[[policy.namespaces]]
namespace = "shop"
mode = "strict"
[[policy.ports]]
namespace = "shop"
service_account = "checkout"
port = 9090
mode = "disable"
"#;
        // n2p1 (on node2) is the meshed one; a is local and not meshed.
        let plan = plan(&inventory(meshed), &settings(), &links()).unwrap();
        let remote: Ipv4Addr = "198.19.2.1".parse().unwrap();
        assert_eq!(plan.mesh_peers[&remote], MESH_MODE_STRICT, "namespace mode");
        let key = PortKey {
            ip: remote.octets(),
            port_be: 9090u16.to_be(),
            _pad: 0,
        };
        assert_eq!(plan.port_modes[&key], MESH_MODE_DISABLED);
        let local = plan.endpoints[&"198.19.1.1".parse().unwrap()];
        assert_eq!(local.mode, MESH_MODE_DISABLED, "no [pods.mesh]: not meshed");
    }

    /// Two meshed pods on node1 (cart .2, checkout .3) and allow rules:
    /// checkout:8080 from cart, checkout on every port from namespace ops,
    /// cart:9000 from payments; checkout's port 9090 is DISABLE.
    const RULED_PODS: &str = r#"
[[pods]]
name = "cart"
node = "node1"
ip = "198.19.1.2"
mac = "02:00:00:00:01:02"
interface = "vp2"
[pods.mesh]
namespace = "shop"
service_account = "cart"

[[pods]]
name = "checkout"
node = "node1"
ip = "198.19.1.3"
mac = "02:00:00:00:01:03"
interface = "vp3"
[pods.mesh]
namespace = "shop"
service_account = "checkout"

[policy]
[[policy.allow]]
namespace = "shop"
service_account = "checkout"
port = 8080
from_identities = ["spiffe://cluster.local/ns/shop/sa/cart"]
[[policy.allow]]
namespace = "shop"
service_account = "checkout"
from_namespaces = ["ops"]
[[policy.allow]]
namespace = "shop"
service_account = "cart"
port = 9000
from_identities = ["spiffe://cluster.local/ns/shop/sa/payments"]
[[policy.ports]]
namespace = "shop"
service_account = "checkout"
port = 9090
mode = "disable"
"#;

    #[test]
    fn same_node_pairs_get_the_allow_rules_verdicts() {
        let key = |source: [u8; 4], destination: [u8; 4], port: u16| SameNodeKey {
            source,
            destination,
            port_be: port.to_be(),
            _pad: 0,
        };
        let (cart, checkout) = ([198, 19, 1, 2], [198, 19, 1, 3]);
        let meshed = plan(&inventory(RULED_PODS), &settings(), &links()).unwrap();
        assert_eq!(
            meshed.same_node_verdicts,
            BTreeMap::from([
                // Only ops may reach checkout on other ports; cart may on 8080.
                (key(cart, checkout, 0), VERDICT_DENY),
                (key(cart, checkout, 8080), VERDICT_ALLOW),
                // cart's own rule names port 9000 only, and not checkout.
                (key(checkout, cart, 9000), VERDICT_DENY),
            ]),
            "pod a is not meshed and n2p1 is on another node: neither is in a pair"
        );
        let without_mesh = OverlaySettings {
            trust_domain: None,
            ..settings()
        };
        let unmeshed = plan(&inventory(RULED_PODS), &without_mesh, &links()).unwrap();
        assert!(
            unmeshed.same_node_verdicts.is_empty(),
            "no mesh, no verdicts"
        );
    }

    #[test]
    fn plaintext_is_refused_where_allow_rules_select_a_port() {
        let key = |ip: [u8; 4], port: u16| PortKey {
            ip,
            port_be: port.to_be(),
            _pad: 0,
        };
        let (cart, checkout) = ([198, 19, 1, 2], [198, 19, 1, 3]);
        let meshed = plan(&inventory(RULED_PODS), &settings(), &links()).unwrap();
        assert_eq!(
            meshed.plaintext_verdicts,
            BTreeMap::from([
                // Every port of checkout is selected, but DISABLE turns 9090 off.
                (key(checkout, 0), VERDICT_DENY),
                (key(checkout, 9090), VERDICT_ALLOW),
                // Only cart's 9000 is.
                (key(cart, 9000), VERDICT_DENY),
            ])
        );
    }

    #[test]
    fn missing_local_veth_is_a_warning_not_an_error() {
        let mut links = links();
        links.remove("vp1");
        let plan = plan(&inventory(""), &settings(), &links).unwrap();
        assert!(plan.endpoints.is_empty());
        assert!(plan.warnings[0].contains("vp1"), "{:?}", plan.warnings);
    }

    #[test]
    fn unknown_node_or_underlay_is_an_error() {
        let mut wrong = settings();
        wrong.node_name = "node9".into();
        assert!(
            plan(&inventory(""), &wrong, &links())
                .unwrap_err()
                .contains("node9")
        );
        let mut wrong = settings();
        wrong.underlay_interface = "eth7".into();
        assert!(
            plan(&inventory(""), &wrong, &links())
                .unwrap_err()
                .contains("eth7")
        );
    }
}
