//! How Veil reads core `Pod` objects, in one place: the node agent (its own
//! pods) and the controller (every pod, for the other nodes) must agree on
//! which pods are meshed, as whom, and with which address.

use k8s_openapi::api::core::v1::Pod;

use crate::MTLSMode;

/// Pod annotation that meshes a pod: `enabled` (mode inherited from the
/// namespace and mesh policy), `strict`, `permissive` or `disable`.
pub const MTLS_ANNOTATION: &str = "veil.dev/mtls";

/// What a pod's `veil.dev/mtls` annotation asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodMtls {
    /// Not meshed: no annotation, or `disable`.
    Off,
    /// Meshed, the mode inherited (`enabled`).
    Inherit,
    /// Meshed with this workload-level mode (`strict`, `permissive`).
    Mode(MTLSMode),
}

/// `namespace/name`.
pub fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        namespace(pod),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

pub fn namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

/// The service account the pod runs as (its identity): `default` when unset.
pub fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|sa| !sa.is_empty())
        .unwrap_or("default")
}

/// The pod's `veil.dev/mtls` annotation (case-insensitive); an unknown value
/// is an error naming the pod and the accepted values.
pub fn mtls(pod: &Pod) -> Result<PodMtls, String> {
    let Some(value) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MTLS_ANNOTATION))
    else {
        return Ok(PodMtls::Off);
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "enabled" | "true" => Ok(PodMtls::Inherit),
        "strict" => Ok(PodMtls::Mode(MTLSMode::Strict)),
        "permissive" => Ok(PodMtls::Mode(MTLSMode::Permissive)),
        "disable" | "disabled" | "false" => Ok(PodMtls::Off),
        other => Err(format!(
            "pod {}: {MTLS_ANNOTATION}={other:?} is not one of enabled, strict, permissive, \
             disable; the pod is left out until it is fixed",
            key(pod)
        )),
    }
}

/// The pod's IPv4 address (the IPv4 one of `status.podIPs`, else
/// `status.podIP`), once it has one.
pub fn ipv4(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    status
        .pod_ips
        .as_ref()
        .and_then(|ips| {
            ips.iter()
                .find(|ip| !ip.ip.contains(':'))
                .map(|ip| ip.ip.clone())
        })
        .or_else(|| status.pod_ip.clone())
}

/// Whether the pod has ended (`Succeeded` or `Failed`): no part in the overlay.
pub fn finished(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed")
}

/// Whether the pod uses the node's network (not an overlay endpoint).
pub fn host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network) == Some(true)
}

/// The object's `resourceVersion` as a number (etcd's revision), 0 when
/// absent: event sequences are built from it.
pub fn resource_version(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotation: Option<&str>) -> Pod {
        let annotations = annotation.map_or(
            serde_json::json!({}),
            |v| serde_json::json!({ MTLS_ANNOTATION: v }),
        );
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cart-1", "namespace": "shop", "annotations": annotations},
            "spec": {"containers": []},
            "status": {"podIP": "198.19.1.7", "podIPs": [{"ip": "fd00::7"}, {"ip": "198.19.1.7"}]}
        }))
        .unwrap()
    }

    #[test]
    fn the_annotation_reads_the_same_for_every_reader() {
        assert_eq!(mtls(&pod(None)), Ok(PodMtls::Off));
        assert_eq!(mtls(&pod(Some("Enabled"))), Ok(PodMtls::Inherit));
        assert_eq!(
            mtls(&pod(Some("STRICT"))),
            Ok(PodMtls::Mode(MTLSMode::Strict))
        );
        assert_eq!(mtls(&pod(Some("disable"))), Ok(PodMtls::Off));
        let error = mtls(&pod(Some("stirct"))).unwrap_err();
        assert!(
            error.contains("shop/cart-1") && error.contains("stirct"),
            "{error}"
        );
    }

    #[test]
    fn the_ipv4_address_wins_and_the_service_account_defaults() {
        let pod = pod(None);
        assert_eq!(ipv4(&pod).as_deref(), Some("198.19.1.7"));
        assert_eq!(service_account(&pod), "default");
        assert_eq!(key(&pod), "shop/cart-1");
        assert!(!finished(&pod) && !host_network(&pod));
    }
}
