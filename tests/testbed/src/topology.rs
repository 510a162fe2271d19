//! Building and tearing down a topology of nodes and pods.

use std::{collections::HashMap, io::Write, path::Path};

use crate::{
    Result, TestbedError,
    addressing::{self, PodRef, TEST_RANGE, VXLAN_OVERHEAD},
    io_error,
    netns::{self, NetNs},
};

/// How pod traffic between nodes is routed by the test bed itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Routing {
    /// Plain routes: node A sends node B's pod CIDR to B's underlay address.
    /// The baseline of every benchmark, and what the datapath counters ride on.
    #[default]
    Direct,
    /// No routes between nodes: something else (Veil's overlay) must carry the traffic.
    None,
}

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologySpec {
    /// Short name (1 to 8 of `a-z0-9`); namespaces are called `veil-<name>-…`.
    pub name: String,
    pub nodes: usize,
    pub pods_per_node: usize,
    /// MTU of the underlay links; pods get this minus the VXLAN overhead.
    pub underlay_mtu: u32,
    pub routing: Routing,
}

impl TopologySpec {
    /// Two nodes with one pod each, 1500-byte underlay, direct routing.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            nodes: 2,
            pods_per_node: 1,
            underlay_mtu: 1500,
            routing: Routing::Direct,
        }
    }

    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    pub fn pods_per_node(mut self, pods: usize) -> Self {
        self.pods_per_node = pods;
        self
    }

    pub fn underlay_mtu(mut self, mtu: u32) -> Self {
        self.underlay_mtu = mtu;
        self
    }

    pub fn routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }

    /// MTU of every pod interface.
    pub fn pod_mtu(&self) -> u32 {
        self.underlay_mtu - VXLAN_OVERHEAD
    }

    /// Prefix of every namespace this topology creates.
    pub fn prefix(&self) -> String {
        format!("veil-{}-", self.name)
    }

    fn validate(&self) -> Result<()> {
        let name_ok = (1..=8).contains(&self.name.len())
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let problem = if !name_ok {
            format!("name {:?} must be 1 to 8 characters of a-z0-9", self.name)
        } else if !(1..=addressing::MAX_NODES).contains(&self.nodes) {
            format!(
                "{} nodes: must be 1 to {}",
                self.nodes,
                addressing::MAX_NODES
            )
        } else if !(1..=addressing::MAX_PODS_PER_NODE).contains(&self.pods_per_node) {
            format!(
                "{} pods per node: must be 1 to {}",
                self.pods_per_node,
                addressing::MAX_PODS_PER_NODE
            )
        } else if !(576 + VXLAN_OVERHEAD..=9000).contains(&self.underlay_mtu) {
            format!("underlay MTU {} must be 626 to 9000", self.underlay_mtu)
        } else {
            return Ok(());
        };
        Err(TestbedError::Invalid(problem))
    }
}

/// A built topology. Dropping it kills what runs inside and deletes every namespace.
pub struct Topology {
    spec: TopologySpec,
    /// Every namespace created, in creation order (torn down in reverse).
    created: Vec<NetNs>,
    /// Pods moved away from the node that owns their address, and where to.
    moved: HashMap<PodRef, usize>,
    /// Meshed pods and their settings, for the inventory.
    mesh: HashMap<PodRef, PodMesh>,
    /// TOML appended to the inventory (e.g. a `[policy]` section).
    inventory_extra: String,
    /// Pods left out of the inventory file (learnt another way, e.g. events).
    hidden: std::collections::HashSet<PodRef>,
    workdir: tempfile::TempDir,
}

/// A pod's mesh membership, as the inventory's `[pods.mesh]` table says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodMesh {
    pub namespace: String,
    pub service_account: String,
    /// `strict`, `permissive` or `disable`.
    pub mode: String,
}

impl PodMesh {
    pub fn new(namespace: &str, service_account: &str, mode: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            mode: mode.into(),
        }
    }
}

impl Topology {
    /// Builds `spec`, first cleaning away a stale topology of the same name.
    pub fn build(spec: TopologySpec) -> Result<Self> {
        spec.validate()?;
        clean_stale(&spec.prefix())?;
        let workdir = tempfile::Builder::new()
            .prefix(&format!("veil-testbed-{}-", spec.name))
            .tempdir()
            .map_err(io_error("cannot create the test bed's work directory"))?;
        let mut topology = Self {
            spec,
            created: Vec::new(),
            moved: HashMap::new(),
            mesh: HashMap::new(),
            inventory_extra: String::new(),
            hidden: Default::default(),
            workdir,
        };
        // On error `topology` drops here and removes whatever was built.
        topology.build_underlay()?;
        for node in 1..=topology.spec.nodes {
            topology.build_node(node)?;
            for pod in 1..=topology.spec.pods_per_node {
                topology.build_pod(PodRef::new(node, pod))?;
            }
        }
        if topology.spec.routing == Routing::Direct {
            topology.add_direct_routes()?;
        }
        Ok(topology)
    }

    pub fn spec(&self) -> &TopologySpec {
        &self.spec
    }

    /// Scratch directory for configs and logs; removed on drop.
    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    /// The underlay switch's namespace.
    pub fn fabric(&self) -> NetNs {
        self.ns("ul")
    }

    /// Node `node`'s namespace (from 1).
    pub fn node(&self, node: usize) -> NetNs {
        self.ns(&format!("n{node}"))
    }

    /// The pod's namespace.
    pub fn pod(&self, pod: PodRef) -> NetNs {
        self.ns(&format!("n{}p{}", pod.node, pod.pod))
    }

    /// Every pod, node by node.
    pub fn pods(&self) -> Vec<PodRef> {
        (1..=self.spec.nodes)
            .flat_map(|n| (1..=self.spec.pods_per_node).map(move |p| PodRef::new(n, p)))
            .collect()
    }

    /// Host-side veth names of the pods running on `node` now.
    pub fn pod_veths(&self, node: usize) -> Vec<String> {
        self.pods()
            .into_iter()
            .filter(|&pod| self.location(pod) == node)
            .map(|pod| self.host_veth(pod))
            .collect()
    }

    /// The pod's host-side veth on the node it runs on now.
    pub fn host_veth(&self, pod: PodRef) -> String {
        match self.moved.get(&pod) {
            Some(_) => format!("v{}p{}", pod.node, pod.pod),
            None => pod.host_veth(),
        }
    }

    /// Makes `pod` meshed with `mesh` (or not meshed with `None`) in the
    /// inventory written next.
    pub fn set_mesh(&mut self, pod: PodRef, mesh: Option<PodMesh>) {
        match mesh {
            Some(mesh) => self.mesh.insert(pod, mesh),
            None => self.mesh.remove(&pod),
        };
    }

    /// Appends `toml` (such as a `[policy]` section) to every inventory written.
    pub fn set_inventory_extra(&mut self, toml: &str) {
        self.inventory_extra = toml.into();
    }

    /// Leaves `pod` out of the inventory file written next.
    pub fn hide_from_inventory(&mut self, pod: PodRef) {
        self.hidden.insert(pod);
    }

    pub(crate) fn is_hidden(&self, pod: PodRef) -> bool {
        self.hidden.contains(&pod)
    }

    pub(crate) fn inventory_extra(&self) -> &str {
        &self.inventory_extra
    }

    pub(crate) fn mesh_of(&self, pod: PodRef) -> Option<&PodMesh> {
        self.mesh.get(&pod)
    }

    pub(crate) fn moved_to(&self, pod: PodRef) -> Option<usize> {
        self.moved.get(&pod).copied()
    }

    /// Moves `pod` to node `to`, keeping its namespace and address: its veth
    /// on the old node goes, a new one on `to` comes (named `v<n>p<p>`).
    /// Routing between nodes is not touched: the overlay's inventory must say
    /// where the pod is now (see [`Self::write_inventory`]).
    pub fn move_pod(&mut self, pod: PodRef, to: usize) -> Result<()> {
        let from = self.location(pod);
        self.node(from).ip(&["link", "del", &self.host_veth(pod)])?;
        if to == pod.node {
            self.moved.remove(&pod);
        } else {
            self.moved.insert(pod, to);
        }
        self.connect_pod(pod, to)
    }

    fn ns(&self, suffix: &str) -> NetNs {
        let name = format!("{}{suffix}", self.spec.prefix());
        self.created
            .iter()
            .find(|ns| ns.name() == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} is not part of this topology"))
    }

    fn create(&mut self, suffix: &str) -> Result<NetNs> {
        let ns = NetNs::create(&format!("{}{suffix}", self.spec.prefix()))?;
        self.created.push(ns.clone());
        Ok(ns)
    }

    fn build_underlay(&mut self) -> Result<()> {
        let fabric = self.create("ul")?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        Ok(())
    }

    fn build_node(&mut self, node: usize) -> Result<()> {
        let fabric = self.fabric();
        let ns = self.create(&format!("n{node}"))?;
        let mtu = self.spec.underlay_mtu.to_string();
        let switch_port = format!("u{node}");
        fabric.ip(&[
            "link",
            "add",
            &switch_port,
            "type",
            "veth",
            "peer",
            "name",
            "ul0",
            "netns",
            ns.name(),
        ])?;
        fabric.ip(&[
            "link",
            "set",
            &switch_port,
            "master",
            "br0",
            "mtu",
            &mtu,
            "up",
        ])?;
        // Behave like a wire: frames leave the switch with complete checksums,
        // as they arrive from a real NIC. (veth would otherwise hand on
        // CHECKSUM_PARTIAL packets, which XDP on the receiving node cannot keep.)
        fabric.ethtool(&["-K", &switch_port, "tx", "off"])?;
        ns.ip(&["link", "set", "ul0", "mtu", &mtu, "up"])?;
        // Receive like a NIC: GRO re-aggregates the wire's MTU-sized frames.
        ns.ethtool(&["-K", "ul0", "gro", "on"])?;
        let underlay = format!(
            "{}/{}",
            addressing::node_underlay_ip(node),
            addressing::UNDERLAY_PREFIX_LEN
        );
        ns.ip(&["addr", "add", &underlay, "dev", "ul0"])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        Ok(())
    }

    fn build_pod(&mut self, pod: PodRef) -> Result<()> {
        self.create(&format!("n{}p{}", pod.node, pod.pod))?;
        self.connect_pod(pod, pod.node)
    }

    /// Joins the pod's namespace to node `node` with a fresh veth pair.
    fn connect_pod(&self, pod: PodRef, node_number: usize) -> Result<()> {
        let node = self.node(node_number);
        let ns = self.pod(pod);
        let mtu = self.spec.pod_mtu().to_string();
        let veth = self.host_veth(pod);
        let gateway = addressing::node_pod_gateway(node_number).to_string();
        let pod_ip = pod.ip().to_string();
        node.ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        node.ip(&["link", "set", &veth, "mtu", &mtu, "up"])?;
        node.ip(&["addr", "add", &format!("{gateway}/32"), "dev", &veth])?;
        node.ip(&[
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            &veth,
            "src",
            &gateway,
        ])?;
        ns.ip(&["link", "set", "eth0", "mtu", &mtu, "up"])?;
        // A veth only takes XDP-redirected frames when its peer runs NAPI:
        // GRO on the pod side turns that on (Veil's overlay redirects there).
        ns.ethtool(&["-K", "eth0", "gro", "on"])?;
        ns.ip(&["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
        ns.ip(&["route", "replace", &gateway, "dev", "eth0", "scope", "link"])?;
        ns.ip(&[
            "route", "replace", TEST_RANGE, "via", &gateway, "dev", "eth0",
        ])?;
        Ok(())
    }

    fn add_direct_routes(&self) -> Result<()> {
        for node in 1..=self.spec.nodes {
            for other in (1..=self.spec.nodes).filter(|&o| o != node) {
                self.node(node).ip(&[
                    "route",
                    "add",
                    &addressing::node_pod_cidr(other),
                    "via",
                    &addressing::node_underlay_ip(other).to_string(),
                    "dev",
                    "ul0",
                ])?;
            }
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(error) = ns.delete() {
                let _ = writeln!(std::io::stderr(), "test bed teardown: {error}");
            }
        }
    }
}

/// Deletes namespaces left by an earlier run that died before its teardown.
fn clean_stale(prefix: &str) -> Result<()> {
    let stale = netns::existing_with_prefix(prefix);
    if stale.is_empty() {
        return Ok(());
    }
    let _ = writeln!(
        std::io::stderr(),
        "test bed: found a stale topology ({}); deleting it before building a new one",
        stale.join(", ")
    );
    for name in stale.iter().rev() {
        netns::delete_named(name)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_validation_names_the_problem() {
        let bad_name = TopologySpec::new("Bad_Name").validate().unwrap_err();
        assert!(bad_name.to_string().contains("a-z0-9"), "{bad_name}");
        let no_nodes = TopologySpec::new("t").nodes(0).validate().unwrap_err();
        assert!(no_nodes.to_string().contains("0 nodes"), "{no_nodes}");
        let tiny_mtu = TopologySpec::new("t")
            .underlay_mtu(500)
            .validate()
            .unwrap_err();
        assert!(tiny_mtu.to_string().contains("MTU 500"), "{tiny_mtu}");
        TopologySpec::new("t1")
            .nodes(3)
            .pods_per_node(2)
            .validate()
            .unwrap();
    }

    #[test]
    fn pod_mtu_leaves_room_for_vxlan() {
        assert_eq!(TopologySpec::new("t").pod_mtu(), 1450);
        assert_eq!(TopologySpec::new("t").underlay_mtu(9000).pod_mtu(), 8950);
    }
}
