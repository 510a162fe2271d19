//! Whether the node an `ECDSACert` names runs the workload it asks for.
//!
//! `ECDSACert`s are cluster-scoped and every agent may write them (RBAC
//! cannot narrow a cluster-scoped resource to one node), so a CSR naming the
//! right identity proves nothing about who may hold it. The controller
//! therefore signs a workload identity only for a node that has a meshed pod
//! of that service account scheduled on it — the rule Istio's CA applies to
//! ztunnel's requests. Together with the admission policy in
//! `deploy/kubernetes/22-admission-agent.yaml`, which lets an agent write
//! only requests naming its own node, a compromised node can obtain the
//! identities of the pods scheduled on it and no others.
//!
//! The pods are read from the API server when a certificate is about to be
//! signed (issue or renewal), never for a reconcile that changes nothing:
//! one list of the identity's namespace, narrowed by the server to the
//! running pods of the service account on the node (field selectors), so it
//! returns one pod or a few, not the namespace. The read is consistent (no
//! `resourceVersion`), so a pod the agent has seen is always found.

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::ListParams};
use veil_crd::pods::{self, PodMtls};
use veil_identity::SpiffeId;

/// Where the workload behind a signing request runs, as the controller found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// A meshed pod of the identity's service account is scheduled on the node.
    OnNode,
    /// No such pod on the node: the request is refused.
    NotOnNode,
}

/// Whether `node` is a valid Kubernetes node name (a DNS subdomain: at most
/// 253 characters of lowercase letters, digits, `-` and `.`, alphanumeric at
/// both ends). Checked before the name goes into a field selector, where a
/// `,` or `=` would add terms of its own.
pub fn valid_node_name(node: &str) -> bool {
    let bytes = node.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(b))
}

/// Whether `pod` entitles its node to `identity`: it runs as the identity's
/// service account in the identity's namespace, is meshed (its agent asks
/// for certificates only for those), uses the pod network and has not ended.
pub fn entitles(pod: &Pod, node: &str, identity: &SpiffeId) -> bool {
    let scheduled_on = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    scheduled_on == Some(node)
        && pods::namespace(pod) == identity.namespace()
        && pods::service_account(pod) == identity.service_account()
        && matches!(pods::mtls(pod), Ok(PodMtls::Inherit | PodMtls::Mode(_)))
        && !pods::host_network(pod)
        && !pods::finished(pod)
}

/// The pods that could entitle `node` to `identity`, as a field selector:
/// the API server sends only those (usually one pod, not the node's whole
/// namespace). `node` must have passed [`valid_node_name`]; a SPIFFE ID's
/// service account is a Kubernetes name already.
fn field_selector(node: &str, identity: &SpiffeId) -> String {
    format!(
        "spec.nodeName={node},spec.serviceAccountName={},spec.hostNetwork=false,\
         status.phase!=Succeeded,status.phase!=Failed",
        identity.service_account()
    )
}

/// Looks up where `identity`'s workload runs relative to `node` (a name
/// [`valid_node_name`] accepted).
pub async fn find(
    client: &Client,
    node: &str,
    identity: &SpiffeId,
) -> Result<Placement, kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), identity.namespace());
    let on_node = api
        .list(&ListParams::default().fields(&field_selector(node, identity)))
        .await?;
    Ok(
        if on_node
            .items
            .iter()
            .any(|pod| entitles(pod, node, identity))
        {
            Placement::OnNode
        } else {
            Placement::NotOnNode
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(node: &str, service_account: &str, annotation: Option<&str>) -> Pod {
        let annotations = annotation.map_or(
            serde_json::json!({}),
            |v| serde_json::json!({ pods::MTLS_ANNOTATION: v }),
        );
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cart-1", "namespace": "shop", "annotations": annotations},
            "spec": {"nodeName": node, "serviceAccountName": service_account, "containers": []},
        }))
        .unwrap()
    }

    fn cart() -> SpiffeId {
        "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap()
    }

    #[test]
    fn only_a_meshed_running_pod_of_the_service_account_on_the_node_entitles_it() {
        let identity = cart();
        assert!(entitles(
            &pod("node1", "cart", Some("enabled")),
            "node1",
            &identity
        ));
        assert!(entitles(
            &pod("node1", "cart", Some("strict")),
            "node1",
            &identity
        ));
        // Another node, another service account, not meshed.
        assert!(!entitles(
            &pod("node2", "cart", Some("enabled")),
            "node1",
            &identity
        ));
        assert!(!entitles(
            &pod("node1", "admin", Some("enabled")),
            "node1",
            &identity
        ));
        assert!(!entitles(&pod("node1", "cart", None), "node1", &identity));
        assert!(!entitles(
            &pod("node1", "cart", Some("disable")),
            "node1",
            &identity
        ));
        // Another namespace.
        let other: SpiffeId = "spiffe://cluster.local/ns/bank/sa/cart".parse().unwrap();
        assert!(!entitles(
            &pod("node1", "cart", Some("enabled")),
            "node1",
            &other
        ));
        // Ended, or on the host's network.
        let mut ended = pod("node1", "cart", Some("enabled"));
        ended.status =
            Some(serde_json::from_value(serde_json::json!({"phase": "Succeeded"})).unwrap());
        assert!(!entitles(&ended, "node1", &identity));
        let mut host = pod("node1", "cart", Some("enabled"));
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(!entitles(&host, "node1", &identity));
    }

    #[test]
    fn the_server_sends_only_the_running_pods_of_the_service_account_on_the_node() {
        assert_eq!(
            field_selector("node1", &cart()),
            "spec.nodeName=node1,spec.serviceAccountName=cart,spec.hostNetwork=false,\
             status.phase!=Succeeded,status.phase!=Failed"
        );
    }

    #[test]
    fn node_names_that_could_widen_the_field_selector_are_invalid() {
        assert!(valid_node_name("node1"));
        assert!(valid_node_name("ip-10-0-0-1.ec2.internal"));
        assert!(valid_node_name(&"n".repeat(253)));
        assert!(!valid_node_name(""));
        assert!(!valid_node_name(&"n".repeat(254)));
        assert!(!valid_node_name("node1,metadata.name=x"));
        assert!(!valid_node_name("node1=x"));
        assert!(!valid_node_name("Node1"));
        assert!(!valid_node_name("-node1"));
    }
}
