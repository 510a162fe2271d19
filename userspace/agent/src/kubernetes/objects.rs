//! Reading Kubernetes objects as the overlay's nodes and pods.
//!
//! Pure translation, no I/O: a `Node` becomes a [`NodeSpec`] (pod CIDR,
//! underlay address and MAC), a `Pod` on this node becomes a [`WatchedPod`]
//! (address and mesh membership). Anything that cannot be used says why, so
//! the agent can report it instead of guessing.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Node, Pod};

use veil_crd::{
    MTLSMode, MTLSPolicy,
    pods::{self, PodMtls},
};

use crate::{
    inventory::{Ipv4Cidr, MacAddress, MeshMode, NodeSpec, PodMesh},
    policy::{NamespaceMode, PortMode},
};

/// Node annotation: the underlay address other nodes send VXLAN to (default:
/// the node's first IPv4 `InternalIP`).
pub const UNDERLAY_IP_ANNOTATION: &str = "veil.dev/underlay-ip";
/// Node annotation: the underlay interface's MAC, written by the node's agent.
pub const UNDERLAY_MAC_ANNOTATION: &str = "veil.dev/underlay-mac";

/// A pod of this node as the API server describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchedPod {
    /// `namespace/name`.
    pub name: String,
    /// The Pod object's UID: a pod recreated under the same name (and maybe
    /// the same address) has a new one, and new wiring.
    pub uid: String,
    pub ip: Ipv4Addr,
    pub mesh: Option<PodMesh>,
}

/// The overlay's view of a Node object.
pub fn node_spec(node: &Node) -> Result<NodeSpec, String> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let annotations = node.metadata.annotations.as_ref();
    let spec = node.spec.as_ref();
    let cidr_text = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .and_then(|cidrs| cidrs.iter().find(|c| !c.contains(':')).cloned())
        .or_else(|| spec.and_then(|s| s.pod_cidr.clone()))
        .ok_or_else(|| {
            format!(
                "node {name}: no IPv4 spec.podCIDR (let the controller manager allocate \
                 node CIDRs, --allocate-node-cidrs, or set it on the Node)"
            )
        })?;
    let pod_cidr: Ipv4Cidr = cidr_text
        .parse()
        .map_err(|e| format!("node {name}: spec.podCIDR {e}"))?;
    let underlay_ip = match annotations.and_then(|a| a.get(UNDERLAY_IP_ANNOTATION)) {
        Some(text) => text.parse::<Ipv4Addr>().map_err(|_| {
            format!("node {name}: {UNDERLAY_IP_ANNOTATION}={text:?} is not an IPv4 address")
        })?,
        None => node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|addresses| {
                addresses
                    .iter()
                    .filter(|a| a.type_ == "InternalIP")
                    .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
            })
            .ok_or_else(|| {
                format!(
                    "node {name}: no IPv4 InternalIP and no {UNDERLAY_IP_ANNOTATION} annotation"
                )
            })?,
    };
    let mac_text = annotations
        .and_then(|a| a.get(UNDERLAY_MAC_ANNOTATION))
        .ok_or_else(|| {
            format!(
                "node {name}: no {UNDERLAY_MAC_ANNOTATION} annotation yet (its Veil agent writes \
                 it when it starts; is the agent running there?)"
            )
        })?;
    let underlay_mac: MacAddress = mac_text
        .parse()
        .map_err(|e| format!("node {name}: {UNDERLAY_MAC_ANNOTATION}: {e}"))?;
    Ok(NodeSpec {
        name,
        underlay_ip,
        underlay_mac,
        pod_cidr,
    })
}

/// The pod as a local overlay endpoint, `Ok(None)` when it has no part in
/// the overlay (another node, host network, no address yet, finished).
/// An unreadable `veil.dev/mtls` value is an error: the pod is left out
/// (fail closed) rather than guessed into a weaker mode.
pub fn watched_pod(pod: &Pod, this_node: &str) -> Result<Option<WatchedPod>, String> {
    let name = pods::key(pod);
    let on_this_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(this_node);
    if !on_this_node || pods::host_network(pod) || pods::finished(pod) {
        return Ok(None);
    }
    let Some(ip_text) = pods::ipv4(pod) else {
        return Ok(None);
    };
    let ip: Ipv4Addr = ip_text
        .parse()
        .map_err(|_| format!("pod {name}: status.podIP {ip_text:?} is not an IPv4 address"))?;
    let mode = match pods::mtls(pod)? {
        PodMtls::Off => None,
        PodMtls::Inherit => Some(None),
        PodMtls::Mode(mode) => Some(Some(mesh_mode(mode))),
    };
    let mesh = mode.map(|mode| PodMesh {
        namespace: pods::namespace(pod).to_string(),
        service_account: pods::service_account(pod).to_string(),
        mode,
    });
    Ok(Some(WatchedPod {
        name,
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        ip,
        mesh,
    }))
}

/// What an `MTLSPolicy` sets, at its level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyEntry {
    Namespace(NamespaceMode),
    /// A workload's mode: applies to its pods that set none themselves.
    Workload {
        namespace: String,
        service_account: String,
        mode: MeshMode,
    },
    Port(PortMode),
}

fn mesh_mode(mode: MTLSMode) -> MeshMode {
    match mode {
        MTLSMode::Strict => MeshMode::Strict,
        MTLSMode::Permissive => MeshMode::Permissive,
        MTLSMode::Disable => MeshMode::Disable,
    }
}

/// The policy entry an `MTLSPolicy` stands for.
pub fn policy_entry(policy: &MTLSPolicy) -> Result<PolicyEntry, String> {
    let namespace = policy
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mode = mesh_mode(policy.spec.mode);
    match (&policy.spec.service_account, policy.spec.port) {
        (None, None) => Ok(PolicyEntry::Namespace(NamespaceMode { namespace, mode })),
        (None, Some(port)) => Err(format!(
            "MTLSPolicy {namespace}/{}: port {port} without serviceAccount (a port belongs to a workload)",
            policy.metadata.name.as_deref().unwrap_or_default()
        )),
        (Some(service_account), None) => Ok(PolicyEntry::Workload {
            namespace,
            service_account: service_account.clone(),
            mode,
        }),
        (Some(service_account), Some(port)) => Ok(PolicyEntry::Port(PortMode {
            namespace,
            service_account: service_account.clone(),
            port,
            mode,
        })),
    }
}

#[cfg(test)]
mod tests {
    use veil_crd::pods::MTLS_ANNOTATION;

    use super::*;

    fn node(value: serde_json::Value) -> Node {
        serde_json::from_value(value).unwrap()
    }

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_node_with_cidr_address_and_mac_annotation_is_a_node_spec() {
        let spec = node_spec(&node(serde_json::json!({
            "metadata": {"name": "node2", "annotations": {UNDERLAY_MAC_ANNOTATION: "02:00:00:00:00:02"}},
            "spec": {"podCIDR": "198.19.2.0/24"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node2"},
                {"type": "InternalIP", "address": "198.18.0.2"}
            ]}
        })))
        .unwrap();
        assert_eq!(spec.name, "node2");
        assert_eq!(spec.underlay_ip, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(spec.underlay_mac.0, [2, 0, 0, 0, 0, 2]);
        assert_eq!(String::from(spec.pod_cidr), "198.19.2.0/24");
    }

    #[test]
    fn the_underlay_ip_annotation_overrides_the_internal_ip() {
        let spec = node_spec(&node(serde_json::json!({
            "metadata": {"name": "n", "annotations": {
                UNDERLAY_MAC_ANNOTATION: "02:00:00:00:00:02",
                UNDERLAY_IP_ANNOTATION: "198.18.0.9"}},
            "spec": {"podCIDRs": ["fd00::/64", "198.19.2.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}
        })))
        .unwrap();
        assert_eq!(spec.underlay_ip, Ipv4Addr::new(198, 18, 0, 9));
        assert_eq!(spec.pod_cidr.prefix_len, 24);
    }

    #[test]
    fn incomplete_nodes_say_what_is_missing() {
        let no_mac = node_spec(&node(serde_json::json!({
            "metadata": {"name": "n"},
            "spec": {"podCIDR": "198.19.2.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.2"}]}
        })))
        .unwrap_err();
        assert!(no_mac.contains("is the agent running there"), "{no_mac}");
        let no_cidr = node_spec(&node(serde_json::json!({"metadata": {"name": "n"}}))).unwrap_err();
        assert!(no_cidr.contains("podCIDR"), "{no_cidr}");
    }

    fn a_pod(annotations: serde_json::Value) -> Pod {
        pod(serde_json::json!({
            "metadata": {"name": "cart-1", "namespace": "shop", "annotations": annotations},
            "spec": {"nodeName": "node1", "serviceAccountName": "cart", "containers": []},
            "status": {"phase": "Running", "podIP": "198.19.1.7"}
        }))
    }

    #[test]
    fn the_mtls_annotation_meshes_a_pod_as_its_service_account() {
        let watched = watched_pod(
            &a_pod(serde_json::json!({MTLS_ANNOTATION: "STRICT"})),
            "node1",
        )
        .unwrap()
        .unwrap();
        assert_eq!(watched.name, "shop/cart-1");
        assert_eq!(watched.ip, Ipv4Addr::new(198, 19, 1, 7));
        let mesh = watched.mesh.unwrap();
        assert_eq!(
            (mesh.namespace.as_str(), mesh.service_account.as_str()),
            ("shop", "cart")
        );
        assert_eq!(mesh.mode, Some(MeshMode::Strict));
        let inherit = watched_pod(
            &a_pod(serde_json::json!({MTLS_ANNOTATION: "enabled"})),
            "node1",
        )
        .unwrap()
        .unwrap();
        assert_eq!(inherit.mesh.unwrap().mode, None);
        let plain = watched_pod(&a_pod(serde_json::json!({})), "node1")
            .unwrap()
            .unwrap();
        assert_eq!(plain.mesh, None);
    }

    #[test]
    fn a_misspelt_mode_leaves_the_pod_out() {
        let error = watched_pod(
            &a_pod(serde_json::json!({MTLS_ANNOTATION: "stirct"})),
            "node1",
        )
        .unwrap_err();
        assert!(
            error.contains("shop/cart-1") && error.contains("stirct"),
            "{error}"
        );
    }

    #[test]
    fn mtls_policies_become_namespace_workload_and_port_entries() {
        let policy = |spec: serde_json::Value| -> MTLSPolicy {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "veil.dev/v1alpha1", "kind": "MTLSPolicy",
                "metadata": {"name": "p", "namespace": "shop"}, "spec": spec
            }))
            .unwrap()
        };
        assert_eq!(
            policy_entry(&policy(serde_json::json!({"mode": "STRICT"}))).unwrap(),
            PolicyEntry::Namespace(NamespaceMode {
                namespace: "shop".into(),
                mode: MeshMode::Strict
            })
        );
        assert!(matches!(
            policy_entry(&policy(
                serde_json::json!({"serviceAccount": "cart", "mode": "DISABLE"})
            ))
            .unwrap(),
            PolicyEntry::Workload {
                mode: MeshMode::Disable,
                ..
            }
        ));
        assert!(matches!(
            policy_entry(&policy(
                serde_json::json!({"serviceAccount": "cart", "port": 8080, "mode": "PERMISSIVE"})
            ))
            .unwrap(),
            PolicyEntry::Port(PortMode {
                port: 8080,
                mode: MeshMode::Permissive,
                ..
            })
        ));
        let error =
            policy_entry(&policy(serde_json::json!({"port": 8080, "mode": "STRICT"}))).unwrap_err();
        assert!(error.contains("without serviceAccount"), "{error}");
    }

    #[test]
    fn pods_without_a_part_in_the_overlay_are_skipped() {
        let other_node = a_pod(serde_json::json!({}));
        assert_eq!(watched_pod(&other_node, "node2").unwrap(), None);
        let mut host_network = a_pod(serde_json::json!({}));
        host_network.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(watched_pod(&host_network, "node1").unwrap(), None);
        let mut pending = a_pod(serde_json::json!({}));
        pending.status.as_mut().unwrap().pod_ip = None;
        assert_eq!(watched_pod(&pending, "node1").unwrap(), None);
        let mut done = a_pod(serde_json::json!({}));
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert_eq!(watched_pod(&done, "node1").unwrap(), None);
    }
}
