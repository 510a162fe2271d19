//! The cluster inventory the overlay is built from: nodes and pods.
//!
//! A TOML file (the same file on every node), to which the API server
//! ([`crate::kubernetes`]) and the event bus ([`crate::events_sync`]) add
//! what they learn. The agent re-reads it when
//! it changes and applies the difference to the maps without reloading
//! programs. A file that does not parse or validate is refused with the line
//! or entry and the reason, and the last good state stays in force.

use std::{collections::HashSet, net::Ipv4Addr, path::Path, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::policy::{Policy, Workload};

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read inventory {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("inventory {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("inventory {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// A MAC address written `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddress(pub [u8; 6]);

impl FromStr for MacAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts
                .next()
                .ok_or_else(|| format!("{s:?} is not a MAC address"))?;
            *byte = u8::from_str_radix(part, 16)
                .ok()
                .filter(|_| part.len() == 2)
                .ok_or_else(|| format!("{s:?} is not a MAC address"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address"));
        }
        Ok(Self(bytes))
    }
}

impl TryFrom<String> for MacAddress {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddress> for String {
    fn from(mac: MacAddress) -> Self {
        mac.to_string()
    }
}

impl std::fmt::Display for MacAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// An IPv4 prefix written `a.b.c.d/len`, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.address)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("{s:?} is not an IPv4 CIDR like 198.19.1.0/24");
        let (address, len) = s.split_once('/').ok_or_else(invalid)?;
        let address: Ipv4Addr = address.parse().map_err(|_| invalid())?;
        let prefix_len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(invalid)?;
        let cidr = Self {
            address,
            prefix_len,
        };
        if !cidr.contains(address) {
            return Err(format!("{s:?} has host bits set"));
        }
        Ok(cidr)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(cidr: Ipv4Cidr) -> Self {
        format!("{}/{}", cidr.address, cidr.prefix_len)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    pub underlay_mac: MacAddress,
    pub pod_cidr: Ipv4Cidr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    /// The node the pod runs on now (may differ from the owner of its CIDR after a move).
    pub node: String,
    pub ip: Ipv4Addr,
    /// The pod's own MAC (needed on its node).
    pub mac: MacAddress,
    /// The host-side veth on its node.
    pub interface: String,
    /// Mesh membership; absent means the pod is not meshed (plaintext overlay).
    #[serde(default)]
    pub mesh: Option<PodMesh>,
}

/// A meshed pod's workload identity and mTLS mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodMesh {
    /// Kubernetes namespace (the `ns` part of the SPIFFE ID).
    pub namespace: String,
    /// Service account (the `sa` part of the SPIFFE ID).
    pub service_account: String,
    /// The workload-level mode; inherits namespace, then mesh, when absent
    /// (see [`crate::policy`]).
    #[serde(default)]
    pub mode: Option<MeshMode>,
}

/// How a meshed pod treats plaintext.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeshMode {
    /// Only mTLS from other meshed pods; plaintext TCP from outside the mesh is dropped.
    Strict,
    /// mTLS between meshed pods, plaintext accepted from pods outside the mesh.
    #[default]
    Permissive,
    /// Not meshed: never intercepted.
    Disable,
}

impl MeshMode {
    /// The value the datapath keeps in `LocalEndpoint::mode` / `MESH_PEERS`.
    pub fn datapath_value(self) -> u32 {
        use veil_common::overlay::{MESH_MODE_DISABLED, MESH_MODE_PERMISSIVE, MESH_MODE_STRICT};
        match self {
            Self::Strict => MESH_MODE_STRICT,
            Self::Permissive => MESH_MODE_PERMISSIVE,
            Self::Disable => MESH_MODE_DISABLED,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Permissive => "permissive",
            Self::Disable => "disable",
        }
    }
}

impl PodMesh {
    pub fn workload(&self) -> Workload<'_> {
        Workload {
            namespace: &self.namespace,
            service_account: &self.service_account,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    /// mTLS modes and authorization.
    #[serde(default)]
    pub policy: Policy,
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, InventoryError> {
        let inventory: Self = toml::from_str(text).map_err(|e| InventoryError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        inventory
            .validate()
            .map_err(|reason| InventoryError::Invalid {
                path: path.display().to_string(),
                reason,
            })?;
        Ok(inventory)
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&PodSpec> {
        self.pods.iter().find(|p| p.ip == ip)
    }

    /// The pod's mesh settings and workload-level effective mode, when it
    /// takes part in the mesh (has `[pods.mesh]` and is not DISABLE).
    pub fn meshed<'a>(&self, pod: &'a PodSpec) -> Option<(&'a PodMesh, MeshMode)> {
        let mesh = pod.mesh.as_ref()?;
        let mode = self
            .policy
            .effective_mode(mesh.workload(), mesh.mode, None)
            .mode;
        (mode != MeshMode::Disable).then_some((mesh, mode))
    }

    /// Checks the whole inventory (also after the API server's and the bus's
    /// entries are merged in): unique names and addresses, known nodes,
    /// addresses inside a pod CIDR, no conflicting mTLS settings.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if !names.insert(node.name.as_str()) {
                return Err(format!("nodes[{i}]: node {:?} is listed twice", node.name));
            }
            for other in &self.nodes[i + 1..] {
                if node.pod_cidr.contains(other.pod_cidr.address)
                    || other.pod_cidr.contains(node.pod_cidr.address)
                {
                    return Err(format!(
                        "nodes[{i}]: pod CIDRs of {:?} and {:?} overlap",
                        node.name, other.name
                    ));
                }
            }
        }
        let mut addresses = HashSet::new();
        for (i, pod) in self.pods.iter().enumerate() {
            if self.node(&pod.node).is_none() {
                return Err(format!(
                    "pods[{i}] ({}): node {:?} is not in [[nodes]]",
                    pod.name, pod.node
                ));
            }
            if !addresses.insert(pod.ip) {
                return Err(format!(
                    "pods[{i}] ({}): address {} is used twice",
                    pod.name, pod.ip
                ));
            }
            if !self.nodes.iter().any(|n| n.pod_cidr.contains(pod.ip)) {
                return Err(format!(
                    "pods[{i}] ({}): address {} is in no node's pod_cidr",
                    pod.name, pod.ip
                ));
            }
        }
        let conflicts = self.policy.conflicts(&self.pods);
        if !conflicts.is_empty() {
            return Err(format!(
                "conflicting mTLS settings (fix one side of each): {}",
                conflicts.join("; ")
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two nodes and one pod on node1; other modules' tests build on it.
    pub(crate) const GOOD: &str = r#"
[[nodes]]
name = "node1"
underlay_ip = "198.18.0.1"
underlay_mac = "02:00:00:00:00:01"
pod_cidr = "198.19.1.0/24"

[[nodes]]
name = "node2"
underlay_ip = "198.18.0.2"
underlay_mac = "02:00:00:00:00:02"
pod_cidr = "198.19.2.0/24"

[[pods]]
name = "a"
node = "node1"
ip = "198.19.1.1"
mac = "02:00:00:00:01:01"
interface = "vp1"
"#;

    fn parse(text: &str) -> Result<Inventory, InventoryError> {
        Inventory::parse(text, Path::new("inventory.toml"))
    }

    #[test]
    fn parses_nodes_and_pods() {
        let inventory = parse(GOOD).unwrap();
        assert_eq!(inventory.nodes.len(), 2);
        assert_eq!(inventory.pods[0].mac.0, [2, 0, 0, 0, 1, 1]);
        assert_eq!(inventory.node("node2").unwrap().pod_cidr.prefix_len, 24);
    }

    #[test]
    fn bad_values_are_refused_with_their_line() {
        let error = parse(&GOOD.replace("02:00:00:00:00:02", "02:00:zz"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("line 11"), "{error}");
        assert!(error.contains("not a MAC address"), "{error}");
        let error = parse(&GOOD.replace("198.19.2.0/24", "198.19.2.1/24"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("host bits"), "{error}");
    }

    #[test]
    fn inconsistent_inventories_are_refused() {
        let unknown_node = GOOD.replace("node = \"node1\"", "node = \"node9\"");
        assert!(
            parse(&unknown_node)
                .unwrap_err()
                .to_string()
                .contains("not in [[nodes]]")
        );
        let overlap = GOOD.replace("198.19.2.0/24", "198.19.0.0/16");
        assert!(parse(&overlap).unwrap_err().to_string().contains("overlap"));
        let stray = GOOD.replace("ip = \"198.19.1.1\"", "ip = \"10.0.0.1\"");
        assert!(
            parse(&stray)
                .unwrap_err()
                .to_string()
                .contains("no node's pod_cidr")
        );
    }

    #[test]
    fn conflicting_mtls_settings_refuse_the_inventory() {
        let twice = format!(
            "{GOOD}\n[pods.mesh]\nnamespace = \"shop\"\nservice_account = \"cart\"\nmode = \"strict\"\n\n\
             [[pods]]\nname = \"b\"\nnode = \"node1\"\nip = \"198.19.1.2\"\nmac = \"02:00:00:00:01:02\"\n\
             interface = \"vp2\"\n[pods.mesh]\nnamespace = \"shop\"\nservice_account = \"cart\"\n\
             mode = \"permissive\"\n"
        );
        let error = parse(&twice).unwrap_err().to_string();
        assert!(error.contains("pods \"a\" and \"b\""), "{error}");
        assert!(error.contains("strict and permissive"), "{error}");
    }

    #[test]
    fn cidr_contains() {
        let cidr: Ipv4Cidr = "198.19.1.0/24".parse().unwrap();
        assert!(cidr.contains("198.19.1.77".parse().unwrap()));
        assert!(!cidr.contains("198.19.2.1".parse().unwrap()));
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
    }
}
