//! Veil's Kubernetes custom resources.
//!
//! `MTLSPolicy` (namespaced) sets the mTLS mode of a namespace, a workload or
//! a port; `veilctl generate` writes them. [`pods`] is how the agent and the
//! controller read core Pods (mesh annotation, address), so they agree.
//!
//! `ECDSACert` (cluster-scoped, `veil.dev/v1alpha1`) asks for an ECDSA P-256
//! certificate: a workload identity (SPIFFE ID) from the local CA, or server
//! names from an ACME issuer. The node agent writes the CSR (keys never leave
//! the node); the controller signs or orders, and reports progress in the
//! status. The CRD manifest in `deploy/crds/` is generated from these types
//! by `cargo xtask gen-crds`, and `cargo xtask test` fails when it drifts.

pub mod pods;

use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What certificate to issue, by which issuer.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "veil.dev",
    version = "v1alpha1",
    kind = "ECDSACert",
    plural = "ecdsacerts",
    shortname = "ecdsacert",
    status = "ECDSACertStatus",
    printcolumn = r#"{"name":"Identity","type":"string","jsonPath":".spec.identity"}"#,
    printcolumn = r#"{"name":"Issuer","type":"string","jsonPath":".spec.issuerRef.kind"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Serial","type":"string","priority":1,"jsonPath":".status.serial"}"#,
    printcolumn = r#"{"name":"Not After","type":"date","jsonPath":".status.notAfter"}"#,
    printcolumn = r#"{"name":"Next Renewal","type":"date","priority":1,"jsonPath":".status.nextRenewal"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ECDSACertSpec {
    /// SPIFFE ID of a workload (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`), for
    /// the local CA. Leave empty for ACME server certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// DNS names (ACME server certificates).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// IP addresses (local CA only; public ACME CAs do not issue for them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
    /// PKCS#10 request (PEM) written by the node agent that holds the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
    /// The node whose agent holds the key (workload identities). The
    /// controller signs only while a meshed pod of the identity's service
    /// account is scheduled there, and the admission policy in
    /// `deploy/kubernetes` lets an agent write only its own node's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    pub issuer_ref: IssuerRef,
    /// Requested lifetime, e.g. `24h` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Renew this long before expiry; default: after 2/3 of the lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_before: Option<String>,
    /// The `kubernetes.io/tls` Secret (in the identity's namespace) that the
    /// node agent also writes the certificate and key into — only with its
    /// `write_tls_secrets` on, since that puts the private key in the API
    /// server, which Veil otherwise avoids. Deleted with this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

/// Name of the local CA issuer in `issuerRef` (the mesh's one CA).
pub const LOCAL_CA_ISSUER: &str = "mesh";

/// The label naming the node whose agent wrote an `ECDSACert` (where the
/// node's name can be a label value): each agent watches its own on it.
pub const NODE_LABEL: &str = "veil.dev/node";

impl ECDSACertSpec {
    /// A workload identity from the local CA: what the agent of `node` asks
    /// for, with `csr` once it has made the key. Defaults for everything else.
    pub fn workload(
        identity: impl Into<String>,
        node: impl Into<String>,
        csr: Option<String>,
    ) -> Self {
        Self {
            identity: Some(identity.into()),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            csr,
            node_name: Some(node.into()),
            issuer_ref: IssuerRef {
                kind: IssuerKind::LocalCA,
                name: LOCAL_CA_ISSUER.into(),
            },
            duration: None,
            renew_before: None,
            secret_name: None,
        }
    }
}

/// Which issuer signs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    pub kind: IssuerKind,
    /// Name of the issuer's configuration.
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum IssuerKind {
    /// Veil's local CA: workload identities (client and server auth).
    LocalCA,
    /// An ACME CA: server names only (public CAs stopped issuing client-auth
    /// certificates in 2026).
    ACME,
}

/// Progress and result.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ECDSACertStatus {
    /// `Ready`, `Issuing` and `Failed`, each with a reason and message.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Leaf then intermediates, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_chain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_renewal: Option<String>,
    /// SHA-256 (hex) of the CSR the certificate was issued for: a new CSR
    /// (the agent re-keyed) is issued again at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr_sha256: Option<String>,
}

/// A Kubernetes-style condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

/// The value of `status.csrSha256` for `csr` (the PEM text): SHA-256, lowercase
/// hex. The controller records it; the agent matches it to know the chain in
/// the status is for its current key.
pub fn csr_sha256(csr: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(csr.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The CRD manifests for `deploy/crds/`, as (file name, YAML).
pub fn manifests() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    let header = "# Generated from userspace/crd by `cargo xtask gen-crds`; do not edit.\n";
    Ok(vec![
        (
            "ecdsacert.yaml",
            format!("{header}{}", serde_yaml::to_string(&ECDSACert::crd())?),
        ),
        (
            "mtlspolicy.yaml",
            format!("{header}{}", serde_yaml::to_string(&MTLSPolicy::crd())?),
        ),
    ])
}

/// The mTLS mode a namespace, a workload or one of its ports wants.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum MTLSMode {
    /// Only mTLS from meshed workloads; plaintext from outside the mesh is dropped.
    Strict,
    /// mTLS between meshed workloads, plaintext accepted from outside the mesh.
    Permissive,
    /// Not intercepted: plaintext only.
    Disable,
}

impl MTLSMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "STRICT",
            Self::Permissive => "PERMISSIVE",
            Self::Disable => "DISABLE",
        }
    }
}

/// The mTLS mode of a namespace (no `serviceAccount`), of a workload (its
/// service account) or of one port of a workload. The most specific one
/// decides (port > workload > namespace > mesh default); two policies that
/// set different modes at the same level are a conflict the agents refuse
/// (`veilctl status` names both) rather than resolve silently.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "veil.dev",
    version = "v1alpha1",
    kind = "MTLSPolicy",
    plural = "mtlspolicies",
    shortname = "mtlspolicy",
    namespaced,
    derive = "PartialEq",
    printcolumn = r#"{"name":"Service Account","type":"string","jsonPath":".spec.serviceAccount"}"#,
    printcolumn = r#"{"name":"Port","type":"integer","jsonPath":".spec.port"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MTLSPolicySpec {
    /// The workload (service account) in this namespace; absent: the whole namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// One TCP port of that workload (needs `serviceAccount`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub mode: MTLSMode,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_is_cluster_scoped_with_status_and_printer_columns() {
        let crd = serde_json::to_value(ECDSACert::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "ecdsacerts.veil.dev");
        assert_eq!(crd["spec"]["scope"], "Cluster");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            columns,
            [
                "Identity",
                "Issuer",
                "Ready",
                "Serial",
                "Not After",
                "Next Renewal",
                "Age"
            ]
        );
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["issuerRef"]));
        assert!(spec["properties"]["csr"].is_object());
    }

    #[test]
    fn resources_round_trip_in_the_api_shape() {
        let yaml = r#"
apiVersion: veil.dev/v1alpha1
kind: ECDSACert
metadata:
  name: shop-cart
spec:
  identity: spiffe://cluster.local/ns/shop/sa/cart
  issuerRef: {kind: LocalCA, name: default}
  duration: 24h
"#;
        let cert: ECDSACert = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(cert.spec.issuer_ref.kind, IssuerKind::LocalCA);
        assert_eq!(
            cert.spec.identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/cart")
        );
        assert!(
            cert.spec.secret_name.is_none(),
            "no Secret unless asked for"
        );
    }
}
